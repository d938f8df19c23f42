"""Seeded K-way N-shot episodes on cached features, scored by every scorer on identical episodes.

Episode i is a pure function of (seed, i): class and image choices come from a counter-based
hash of (seed, i, class id, image position), not from a stateful generator. The same
episodes therefore come out for any batch size or worker count, and the first 1,000
episodes of a 10,000-episode run are exactly a 1,000-episode run.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oneshot_bench.cache import Cache, load_cache
from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.head import check_feature_space, load_head
from oneshot_bench.progress import Progress
from oneshot_bench.provenance import check_writable, package_versions, to_jsonable, write_json
from oneshot_bench.retrieval import candidate_mask
from oneshot_bench.scorers import SCORERS, build_scorers
from oneshot_bench.stats import mean_ci95, paired_differences

log = logging.getLogger(__name__)

PROTOCOLS = ("episodes", "seed")
AUTO_ALL_SUPPORTS = 64  # K*N up to this: the head scores every support
AUTO_CANDIDATES = 32  # beyond it: this many FAISS candidates per query
# Bumped whenever the same (seed, i) would draw other images: `run` keys cached results on it.
# 2: Floyd's sampling (1 drew the smallest hashed keys of every image of a class).
SAMPLER_VERSION = 2


@dataclass(frozen=True)
class EpisodeConfig:
    """episodes options. candidates: m values for the pair head (None = automatic, 0 = all)."""

    cache: Path = Path("cache/features.h5")
    head: Path | None = None
    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15
    n_episodes: int = 10_000
    seed: int = 0
    roles: tuple[str, ...] = ("unseen",)
    protocol: str = "episodes"
    episode_file: Path | None = None
    scorers: tuple[str, ...] | None = None
    candidates: tuple[int | None, ...] = (None,)
    batch_size: int = 500
    workers: int = 1
    json_out: Path | None = None
    per_episode_out: Path | None = None
    quiet: bool = False


# --- counter-based randomness -----------------------------------------------------------

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_keys(*parts: np.ndarray | int) -> np.ndarray:
    """Broadcast uint64 hash of integer arrays: a random key per combination of parts."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x243F6A8885A308D3)
        for p in parts:
            h = _mix(np.asarray(h, dtype=np.uint64) ^ (np.asarray(p).astype(np.uint64) + _GOLDEN))
    return h


@dataclass
class Pool:
    """The images episodes draw from. members: (C, max_n) int64 cache rows, -1 padded,
    each class's rows in ascending order; counts: (C,); class_ids: (C,) cache labels."""

    class_ids: np.ndarray
    members: np.ndarray
    counts: np.ndarray
    rows: np.ndarray


def make_pool(cache: Cache, roles: tuple[str, ...]) -> Pool:
    """The images of the classes whose role is in `roles`."""
    return pool_from_labels(cache.labels, cache.rows_with_roles(roles))


def pool_from_labels(labels: np.ndarray, rows: np.ndarray) -> Pool:
    """A pool over `rows` (m,) of an array whose classes are `labels` (n,) int64."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    class_ids = np.unique(labels[rows])
    counts = np.array([(labels[rows] == c).sum() for c in class_ids], dtype=np.int64)
    members = np.full((len(class_ids), int(counts.max()) if len(counts) else 0), -1, dtype=np.int64)
    for k, c in enumerate(class_ids):
        r = rows[labels[rows] == c]
        members[k, : len(r)] = r
    return Pool(class_ids, members, counts, rows)


@dataclass
class EpisodeBatch:
    """support: (E, K, S) cache rows; query: (E, Q) cache rows; query_label: (E, Q) in 0..K-1;
    ids: (E,) episode numbers; classes: (E, K) cache labels."""

    ids: np.ndarray
    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    query_label: np.ndarray


def _uniform_below(h: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Uniform integers in [0, k) from uint64 hashes h: the top 32 bits scaled by k
    (multiply-shift; no division, bias below k / 2^32)."""
    return (((h >> np.uint64(32)) * np.asarray(k).astype(np.uint64)) >> np.uint64(32)).astype(np.int64)


def _distinct(base: np.ndarray, n: np.ndarray, m: int, lead: int | None = None) -> np.ndarray:
    """m distinct integers in [0, n) per entry: (..., m) int64.

    base: (...) uint64 hash of the entry (its randomness); n: (...) int64 sizes, all >= m.
    Floyd's algorithm draws a uniform m-subset in exactly m vectorised steps, touching m
    numbers per entry rather than keying all n of them. lead=None then shuffles all m
    (uniformly random order); lead=S only makes the first S a uniform S-subset of the m
    (S steps of Fisher-Yates): what supports need, the queries' order being irrelevant."""
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), base.shape)
    out = np.empty((m,) + base.shape, dtype=np.int64)  # step axis first: each step's slice is contiguous
    with np.errstate(over="ignore"):
        j = n[None] - m + np.arange(m).reshape((m,) + (1,) * base.ndim)  # step s draws t uniform in [0, j_s]
        steps = np.arange(1, m + 1, dtype=np.uint64).reshape(j.shape[:1] + (1,) * base.ndim)
        draws = _uniform_below(_mix(base[None] + steps * _GOLDEN), j + 1)
        for step in range(m):  # a draw already taken is replaced by j_s, which cannot be
            clash = (out[:step] == draws[step]).any(0)
            out[step] = np.where(clash, j[step], draws[step])
        if lead is None:
            keys = _mix(base[None] + (np.arange(m, dtype=np.uint64) + np.uint64(m + 1)).reshape(steps.shape) * _GOLDEN)
            return np.moveaxis(np.take_along_axis(out, np.argsort(keys, axis=0), 0), 0, -1)
        for s in range(lead):
            r = (s + _uniform_below(_mix(base + np.uint64(m + 1 + s) * _GOLDEN), m - s))[None]
            picked = np.take_along_axis(out, r, 0)
            np.put_along_axis(out, r, out[s][None], 0)
            out[s] = picked[0]
    return np.moveaxis(out, 0, -1)


def sample_episodes(pool: Pool, ids: np.ndarray, seed: int, n_way: int, n_shot: int, n_query: int) -> EpisodeBatch:
    """K-way N-shot episodes number `ids`, each a pure function of (seed, id)."""
    ids = np.asarray(ids, dtype=np.int64)
    chosen = _distinct(hash_keys(seed, ids), len(pool.class_ids), n_way)  # (E, K) pool class positions
    classes = pool.class_ids[chosen]
    take = _distinct(hash_keys(seed, ids[:, None], classes + (1 << 32)), pool.counts[chosen], n_shot + n_query, lead=n_shot)
    rows = pool.members[chosen[:, :, None], take]  # (E, K, S+Q)
    support = rows[:, :, :n_shot]
    query = rows[:, :, n_shot:].reshape(len(ids), n_way * n_query)
    label = np.broadcast_to(np.repeat(np.arange(n_way), n_query)[None, :], query.shape)
    return EpisodeBatch(ids, classes, support, query, np.ascontiguousarray(label))


def sample_seed_protocol(pool: Pool, ids: np.ndarray, seed: int, n_shot: int) -> EpisodeBatch:
    """The seed project's protocol: K = every pool class, N supports each, every other image a query."""
    ids = np.asarray(ids, dtype=np.int64)
    n_cls = len(pool.class_ids)
    keys = hash_keys(seed, ids[:, None], pool.class_ids[None, :] + (1 << 32))  # (E, C)
    take = _distinct(keys, pool.counts[None, :], n_shot, lead=n_shot)  # (E, C, S)
    support = pool.members[np.arange(n_cls)[None, :, None], take]
    flat = pool.members[pool.members >= 0]  # pool rows, class by class
    flat_label = np.repeat(np.arange(n_cls), pool.counts)
    is_support = np.isin(flat[None, :], support.reshape(len(ids), -1)) if len(ids) == 1 else np.stack(
        [np.isin(flat, s.ravel()) for s in support]
    )
    n_q = len(flat) - n_cls * n_shot
    order = np.argsort(is_support, axis=1, kind="stable")[:, :n_q]
    return EpisodeBatch(ids, np.broadcast_to(pool.class_ids, (len(ids), n_cls)), support, flat[order], flat_label[order])


# --- running ----------------------------------------------------------------------------


@dataclass
class ScoreRun:
    """Per-episode accuracies for one scorer (and candidate count)."""

    name: str
    scorer: str
    candidates: int | None
    accuracy: list[np.ndarray] = field(default_factory=list)
    recall: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0


def _score_batch(batch: EpisodeBatch, scorer, m: int | None, feats: np.ndarray):
    """Per-episode accuracy (E,) and candidate recall (E,) (nan without candidates)."""
    support = torch.from_numpy(batch.support)
    query = torch.from_numpy(np.ascontiguousarray(batch.query))
    cand = None
    recall = np.full(len(batch.ids), np.nan)
    n_ep, k, s = batch.support.shape
    if m is not None and m < k * s:
        mask = candidate_mask(feats[batch.support.reshape(n_ep, k * s)], feats[batch.query], m)
        has_true = mask.reshape(n_ep, -1, k, s).any(3)[
            np.arange(n_ep)[:, None], np.arange(batch.query.shape[1])[None, :], batch.query_label
        ]
        recall = has_true.mean(1)
        cand = torch.from_numpy(mask)
    with torch.inference_mode():
        scores = scorer.score(support, query, cand)
    pred = scores.argmax(2).numpy()
    return (pred == batch.query_label).mean(1), recall


def _resolve_candidates(values: tuple[int | None, ...], n_supports: int) -> list[int | None]:
    """None = automatic; 0 = all supports. Returns m values, None meaning all supports."""
    out = []
    for v in values:
        if v is None:
            v = 0 if n_supports <= AUTO_ALL_SUPPORTS else AUTO_CANDIDATES
        if v < 0:
            raise OneShotBenchError(f"--candidates {v} must be positive (or 'all')")
        out.append(None if v == 0 or v >= n_supports else int(v))
    return list(dict.fromkeys(out))


def run_episodes(cfg: EpisodeConfig) -> dict:
    """Run the configured episodes; returns the JSON-able result (also written to cfg.json_out)."""
    for path in (cfg.json_out, cfg.per_episode_out):
        if path is not None:
            check_writable(Path(path))
    cache = load_cache(cfg.cache)
    head, head_meta = None, None
    if cfg.head is not None:
        head, head_meta = load_head(cfg.head)
        check_feature_space(head_meta, cfg.head, cache.attrs, cfg.cache)
    names = list(cfg.scorers) if cfg.scorers else [s for s in SCORERS if s != "pair-head" or head is not None]
    for name in names:
        if name not in SCORERS:
            raise OneShotBenchError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    if cfg.protocol not in PROTOCOLS:
        raise OneShotBenchError(f"unknown protocol {cfg.protocol!r}; use episodes or seed")
    if cfg.episode_file is None:
        pool = make_pool(cache, tuple(cfg.roles))
        _check_pool(cache, pool, cfg)
    seen_train = np.flatnonzero(np.isin(cache.labels, np.flatnonzero(cache.class_roles == "seen")) & (cache.image_split == "train"))
    if not len(seen_train):
        seen_train = cache.rows_with_roles(("seen",))
    seen_mean = _row_mean(cache.features, seen_train) if len(seen_train) else None
    t0 = time.perf_counter()
    if cfg.episode_file is not None:
        batches_fn, n_total, shape = _episode_file_batches(cache, cfg.episode_file)
        pool_rows = np.unique(np.concatenate([np.concatenate([b.support.ravel(), b.query.ravel()]) for b in batches_fn()]))
    else:
        batches_fn, n_total, shape = _sampled_batches(pool, cfg)
        pool_rows = pool.rows
    scorers = build_scorers(names, cache.features, seen_mean, head, pool_rows)
    n_supports = shape[0] * shape[1]
    runs: list[ScoreRun] = []
    for sc in scorers:
        ms = _resolve_candidates(cfg.candidates, n_supports) if sc.name == "pair-head" else [None]
        for m in ms:
            label = sc.name if m is None else f"{sc.name}[m={m}]"
            runs.append(ScoreRun(label, sc.name, m))
    by_name = {sc.name: sc for sc in scorers}

    def work(batch: EpisodeBatch) -> tuple[int, list[tuple[np.ndarray, np.ndarray, float]]]:
        out = []
        for run in runs:
            t = time.perf_counter()
            acc, rec = _score_batch(batch, by_name[run.scorer], run.candidates, cache.features)
            out.append((acc, rec, time.perf_counter() - t))
        return len(batch.ids), out

    with Progress("episodes", total=n_total, quiet=cfg.quiet, unit="ep") as bar:
        with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool_ex:
            # one worker: stay on this thread (no second malloc arena, batches sampled lazily)
            done = map(work, batches_fn()) if cfg.workers <= 1 else pool_ex.map(work, batches_fn())
            for n_done, results in done:
                for run, (acc, rec, secs) in zip(runs, results):
                    run.accuracy.append(acc)
                    run.recall.append(rec)
                    run.seconds += secs
                bar.advance(n_done)
    wall = time.perf_counter() - t0
    per_episode = {r.name: np.concatenate(r.accuracy) for r in runs}
    results = []
    for r in runs:
        mean, ci = mean_ci95(per_episode[r.name])
        rec = np.concatenate(r.recall)
        results.append(
            {
                "scorer": r.name,
                "base_scorer": r.scorer,
                "candidates": "all" if r.candidates is None else r.candidates,
                "accuracy": mean,
                "ci95": ci,
                "n_episodes": int(len(per_episode[r.name])),
                "n_way": shape[0],
                "n_shot": shape[1],
                "n_query": shape[2],
                "wall_s": round(r.seconds, 4),
                "recall": None if np.all(np.isnan(rec)) else float(np.nanmean(rec)),
            }
        )
    report = {
        "kind": "oneshot-bench/episodes",
        "config": to_jsonable(cfg),
        "protocol": "file" if cfg.episode_file else cfg.protocol,
        "sampler_version": SAMPLER_VERSION,
        "cache": {"path": str(cfg.cache), "fingerprint": cache.fingerprint, "data_fingerprint": cache.attrs["data_fingerprint"],
                  "feature_space": cache.feature_space, "dataset": cache.attrs.get("dataset")},
        "head": None if head_meta is None else {"path": str(cfg.head), "config": head_meta["head"],
                                                 "feature_space_sha256": head_meta["feature_space_sha256"],
                                                 "trained_on": head_meta["cache_fingerprint"]},
        "results": results,
        "paired_differences": paired_differences(per_episode),
        "ci_method": "1.96 * population std (ddof=0) / sqrt(n_episodes) over per-episode accuracies",
        "wall_s": round(wall, 4),
        "versions": package_versions(),
    }
    if cfg.json_out is not None:
        write_json(Path(cfg.json_out), report)
    if cfg.per_episode_out is not None:
        write_json(Path(cfg.per_episode_out), {k: v.tolist() for k, v in per_episode.items()})
    return report


def _row_mean(features: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Mean of features[rows], (d,) float32, without copying all the rows at once."""
    total = np.zeros(features.shape[1], dtype=np.float64)
    for start in range(0, len(rows), chunk):
        total += features[rows[start : start + chunk]].sum(0, dtype=np.float64)
    return (total / len(rows)).astype(np.float32)


def _check_pool(cache: Cache, pool: Pool, cfg: EpisodeConfig) -> None:
    if cfg.n_episodes < 1:
        raise OneShotBenchError("--n-episodes must be positive")
    if cfg.n_shot < 1 or (cfg.protocol == "episodes" and min(cfg.n_way, cfg.n_query) < 1):
        raise OneShotBenchError("--n-way, --n-shot and --n-query must be positive")
    n_cls = len(pool.class_ids)
    if n_cls == 0:
        raise OneShotBenchError(f"no classes with roles {','.join(cfg.roles)} in cache {cfg.cache}")
    need = cfg.n_shot + (cfg.n_query if cfg.protocol == "episodes" else 1)
    if cfg.protocol == "episodes" and cfg.n_way > n_cls:
        raise OneShotBenchError(f"--n-way {cfg.n_way} exceeds the {n_cls} classes with roles {','.join(cfg.roles)}")
    if cfg.protocol == "seed" and n_cls < 2:
        raise OneShotBenchError("the seed protocol needs at least two classes")
    small = np.flatnonzero(pool.counts < need)
    if len(small):
        c = small[0]
        raise OneShotBenchError(
            f"class {cache.class_names[pool.class_ids[c]]!r} has {pool.counts[c]} images; n-shot + n-query needs {need}"
        )


def _sampled_batches(pool: Pool, cfg: EpisodeConfig):
    n = cfg.n_episodes
    if cfg.protocol == "seed":
        n_q = len(pool.rows) - len(pool.class_ids) * cfg.n_shot
        shape = (len(pool.class_ids), cfg.n_shot, n_q // len(pool.class_ids))
        step = max(1, min(cfg.batch_size, (1 << 22) // max(1, len(pool.rows) * len(pool.class_ids))))

        def gen():
            for start in range(0, n, step):
                yield sample_seed_protocol(pool, np.arange(start, min(n, start + step)), cfg.seed, cfg.n_shot)
    else:
        shape = (cfg.n_way, cfg.n_shot, cfg.n_query)
        step = max(1, cfg.batch_size)

        def gen():
            for start in range(0, n, step):
                yield sample_episodes(pool, np.arange(start, min(n, start + step)), cfg.seed, cfg.n_way, cfg.n_shot, cfg.n_query)

    return gen, n, shape


def _episode_file_batches(cache: Cache, path: Path):
    """Fixed episodes from JSON: [{"support": {class: [ids]}, "query": {class: [ids]}}, ...]."""
    try:
        episodes = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OneShotBenchError(f"episode file {path} does not exist") from None
    except ValueError as exc:
        raise OneShotBenchError(f"episode file {path} is not valid JSON ({exc})") from None
    if not isinstance(episodes, list) or not episodes:
        raise OneShotBenchError(f"episode file {path} must hold a non-empty list of episodes")
    row_of = {sid: i for i, sid in enumerate(cache.source_ids.tolist())}
    parsed = []
    for e_no, ep in enumerate(episodes):
        if not isinstance(ep, dict) or "support" not in ep or "query" not in ep:
            raise OneShotBenchError(f"episode {e_no} of {path} lacks 'support' or 'query'")
        classes = list(ep["support"])
        shots = {len(v) for v in ep["support"].values()}
        if len(shots) != 1 or 0 in shots:
            raise OneShotBenchError(f"episode {e_no} of {path}: every class needs the same number (>0) of supports")
        for ids in list(ep["support"].values()) + list(ep["query"].values()):
            for sid in ids:
                if sid not in row_of:
                    raise OneShotBenchError(f"episode file {path}: unknown image id {sid!r} (episode {e_no})")
        unknown = [c for c in ep["query"] if c not in ep["support"]]
        if unknown:
            raise OneShotBenchError(f"episode {e_no} of {path}: query class {unknown[0]!r} has no supports")
        support = np.array([[row_of[s] for s in ep["support"][c]] for c in classes], dtype=np.int64)[None]
        q_rows = [row_of[s] for c in classes for s in ep["query"].get(c, [])]
        q_lab = [k for k, c in enumerate(classes) for _ in ep["query"].get(c, [])]
        parsed.append(EpisodeBatch(np.array([e_no]), np.zeros((1, len(classes)), np.int64), support,
                                   np.array([q_rows], np.int64), np.array([q_lab], np.int64)))
    first = parsed[0].support.shape
    shape = (first[1], first[2], parsed[0].query.shape[1] // max(1, first[1]))

    def gen():
        yield from parsed

    return gen, len(parsed), shape
