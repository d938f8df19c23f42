"""`run`: finetune -> encode -> train-head -> episodes, each stage keyed by its inputs.

Each stage's output file name carries a hash of its config and its inputs' fingerprints, so
a second run with the same options reuses every finished stage, a changed option re-runs
exactly the stages it affects, and a killed run resumes (finetune and encode keep partial
state; the others are short and restart).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from oneshot_bench.cache import EncodeConfig, encode, read_attrs
from oneshot_bench.data import DataConfig, open_source
from oneshot_bench.episodes import SAMPLER_VERSION, EpisodeConfig, run_episodes
from oneshot_bench.finetune import FinetuneConfig, finetune, finetune_identity
from oneshot_bench.head import PAIR_SAMPLER_VERSION, HeadConfig, train_head
from oneshot_bench.provenance import (
    TRUNK_KIND,
    check_writable,
    config_hash,
    load_checkpoint,
    package_versions,
    stage_identity,
)
from oneshot_bench.report import build_report, write_report
from oneshot_bench.splits import SplitConfig
from oneshot_bench.trunk import TrunkConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """All stages' options. finetune=False encodes with `trunk.weights` as they are."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    out_dir: Path = Path("cache/runs/default")
    do_finetune: bool = True
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dtype: str = "float32"
    tta: str = "none"
    head: HeadConfig = field(default_factory=HeadConfig)
    n_way: tuple[int, ...] = (5,)
    n_shot: tuple[int, ...] = (1,)
    n_query: int = 15
    n_episodes: int = 10_000
    episode_seed: int = 0
    scorers: tuple[str, ...] | None = None
    candidates: tuple[int | None, ...] = (None,)
    seed_protocol: bool = False
    seed_protocol_episodes: int = 1_000
    quiet: bool = False


@dataclass
class StageRecord:
    name: str
    path: Path
    reused: bool
    seconds: float


def _stage(name: str, path: Path, make) -> StageRecord:
    if path.exists():
        log.info("%s: reusing %s", name, path)
        return StageRecord(name, path, True, 0.0)
    t0 = time.perf_counter()
    make()
    return StageRecord(name, path, False, round(time.perf_counter() - t0, 2))


def run_pipeline(cfg: RunConfig, say=print) -> dict:
    """Run or reuse every stage into cfg.out_dir; returns the report (also written)."""
    out_dir = Path(cfg.out_dir)
    check_writable(out_dir / "report.json")
    index = open_source(cfg.data)
    data_fp = index.fingerprint()
    stages: list[StageRecord] = []

    weights = cfg.trunk.weights
    if cfg.do_finetune:
        ft = dataclasses.replace(cfg.finetune, data=cfg.data, split=cfg.split, trunk=cfg.trunk, quiet=cfg.quiet)
        key = config_hash([finetune_identity(ft), data_fp])
        ft = dataclasses.replace(ft, out=out_dir / f"finetune-{key}.pt")
        stages.append(_stage("finetune", ft.out, lambda: finetune(ft)))
        weights = str(ft.out)
        trunk_id = load_checkpoint(ft.out, TRUNK_KIND)[0]["trunk_sha256"]
    else:
        trunk_id = weights
    enc_trunk = dataclasses.replace(cfg.trunk, weights=weights)
    enc = EncodeConfig(data=cfg.data, split=cfg.split, trunk=enc_trunk, dtype=cfg.dtype, tta=cfg.tta, quiet=cfg.quiet)
    key = config_hash([stage_identity(enc, drop=("weights",)), trunk_id, data_fp])
    enc = dataclasses.replace(enc, out=out_dir / f"cache-{key}.h5")
    stages.append(_stage("encode", enc.out, lambda: encode(enc)))
    cache_attrs = read_attrs(enc.out)
    cache_fp = cache_attrs["data_fingerprint"] + cache_attrs["feature_space_sha256"]

    hc = dataclasses.replace(cfg.head, cache=enc.out, quiet=cfg.quiet)
    key = config_hash([stage_identity(hc, drop=("cache",)), cache_fp, PAIR_SAMPLER_VERSION])
    hc = dataclasses.replace(hc, out=out_dir / f"head-{key}.pt")
    stages.append(_stage("train-head", hc.out, lambda: train_head(hc)))
    head_key = key

    settings = [("episodes", w, s) for s in cfg.n_shot for w in cfg.n_way]
    if cfg.seed_protocol:
        settings.append(("seed", None, cfg.n_shot[0]))
    results = []
    t_ep = time.perf_counter()
    n_reused = 0
    for protocol, n_way, n_shot in settings:
        ec = EpisodeConfig(
            cache=enc.out, head=hc.out, n_way=n_way or 0, n_shot=n_shot, n_query=cfg.n_query,
            n_episodes=cfg.n_episodes if protocol == "episodes" else cfg.seed_protocol_episodes,
            seed=cfg.episode_seed, protocol=protocol, scorers=cfg.scorers, candidates=cfg.candidates, quiet=cfg.quiet,
        )
        key = config_hash([stage_identity(ec, drop=("cache", "head", "batch_size")), cache_fp, head_key, SAMPLER_VERSION])
        path = out_dir / f"episodes-{protocol}-{n_way or 'all'}w{n_shot}s-{key}.json"
        per_ep = path.with_name(path.stem + ".per_episode.json")
        ec = dataclasses.replace(ec, json_out=path, per_episode_out=per_ep)
        if path.exists():
            n_reused += 1
            results.append(json.loads(path.read_text()))
        else:
            results.append(run_episodes(ec))
    stages.append(StageRecord("episodes", out_dir, n_reused == len(settings), round(time.perf_counter() - t_ep, 2)))
    for st in stages:
        say(f"{st.name}: {'reused ' + str(st.path) if st.reused else f'ran in {st.seconds:.1f} s'}")
    report = build_report(cfg, stages, results, package_versions())
    write_report(report, out_dir)
    return report


__all__ = ["RunConfig", "run_pipeline"]
