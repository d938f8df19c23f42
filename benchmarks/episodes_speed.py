"""Episode throughput per scorer against a per-episode Python loop, in one run; peak memory.

Ours: `run_episodes` on 10,000 5-way 1-shot 15-query episodes (--quick: 2,000), every scorer
on identical episodes, vectorised in batches. Reference: the usual few-shot loop, one
episode at a time (random.sample, gather into tensors, score with torch), timed on 500 episodes
(--quick: 200) and compared as episodes/s. Peak memory: the growth of the process's peak
RSS from before the cache is loaded to the end of the run, in a fresh interpreter.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import parse, require_data, write
from head_speed import bench_cache

from oneshot_bench.episodes import EpisodeConfig, run_episodes
from oneshot_bench.head import HeadConfig, load_head, train_head


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(cache_path: str, head_path: str, n: int, q) -> None:
    import faiss  # noqa: F401  (libraries imported before the baseline is read)
    import h5py  # noqa: F401

    before = rss_mb()
    t = time.perf_counter()
    run_episodes(EpisodeConfig(cache=Path(cache_path), head=Path(head_path), n_episodes=n, quiet=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put({"peak_growth_mb": peak - before, "rss_before_mb": before, "seconds": time.perf_counter() - t})


def reference_loop(cache, head, n: int, scorer: str) -> float:
    """Seconds for n episodes the usual way of few-shot code (e.g. an easyfsl-style task
    sampler and evaluation loop): each episode is sampled with `random.sample`, its
    features are gathered into tensors, scored with torch, and its accuracy read back."""
    import random

    import torch.nn.functional as F

    rows = cache.rows_with_roles(("unseen",))
    feats = torch.from_numpy(cache.features)
    by_class = {int(c): rows[cache.labels[rows] == c].tolist() for c in np.unique(cache.labels[rows])}
    classes = list(by_class)
    mean = feats[torch.from_numpy(cache.rows_with_roles(("seen",)))].mean(0)
    rnd = random.Random(0)
    labels = torch.arange(5).repeat_interleave(15)
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(n):
            chosen = rnd.sample(classes, 5)
            items = [rnd.sample(by_class[c], 16) for c in chosen]
            sup = feats[torch.tensor([it[0] for it in items])]
            qry = feats[torch.tensor([i for it in items for i in it[1:]])]
            if scorer == "cosine":
                scores = F.normalize(qry, dim=1) @ F.normalize(sup, dim=1).T
            elif scorer == "l2":
                scores = -torch.cdist(qry, sup) ** 2
            elif scorer == "cl2n":
                scores = -torch.cdist(F.normalize(qry - mean, dim=1), F.normalize(sup - mean, dim=1)) ** 2
            else:
                scores = torch.sigmoid(head(qry.repeat_interleave(5, 0), sup.repeat(len(qry), 1))).view(len(qry), 5)
            (scores.argmax(1) == labels).float().mean().item()
    return time.perf_counter() - t


def main() -> None:
    args = parse(__doc__.splitlines()[0], "episodes_speed")
    require_data(args.data)
    cache = bench_cache(args.data, args.quick)
    head_path = cache.path.with_name(cache.path.stem + "-head.pt")
    if not head_path.exists():
        train_head(HeadConfig(cache=cache.path, out=head_path, epochs=3, quiet=True))
    head, _ = load_head(head_path)
    n = 2000 if args.quick else 10_000
    n_ref = 200 if args.quick else 500
    run_episodes(EpisodeConfig(cache=cache.path, head=head_path, n_episodes=200, quiet=True))  # warm-up
    report = run_episodes(EpisodeConfig(cache=cache.path, head=head_path, n_episodes=n, quiet=True))
    per = {}
    for r in report["results"]:
        ref_s = reference_loop(cache, head, n_ref, r["scorer"])
        ours_eps, ref_eps = r["n_episodes"] / r["wall_s"], n_ref / ref_s
        per[r["scorer"]] = {"seconds": r["wall_s"], "episodes_per_s": ours_eps, "accuracy": r["accuracy"], "ci95": r["ci95"],
                            "reference_episodes_per_s": ref_eps, "reference_seconds_for_n_ref": ref_s, "ratio": ours_eps / ref_eps}
    # a fresh interpreter, as a user's `oneshot-bench episodes` would be
    code = (f"import queue, json; from episodes_speed import _measure; q = queue.Queue(); "
            f"_measure({str(cache.path)!r}, {str(head_path)!r}, {n}, q); print(json.dumps(q.get()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    feature_mb = cache.features.nbytes / 2**20
    limit = 2 * feature_mb + 300
    targets = {"ratio_min": 50, "cosine_s_max": 1.0, "pair_head_s_max": 2.0, "peak_mb_max": limit}
    meets = (all(v["ratio"] >= 50 for v in per.values()) and per["cosine"]["seconds"] < 1.0
             and per["pair-head"]["seconds"] < 2.0 and mem["peak_growth_mb"] < limit)
    write(args.out, {
        "benchmark": "episodes_speed",
        "quick": args.quick,
        "sizes": {"n_episodes": n, "n_reference_episodes": n_ref, "n_way": 5, "n_shot": 1, "n_query": 15,
                  "cache_images": int(len(cache.labels)), "unseen_classes": int((cache.class_roles == "unseen").sum()),
                  "feature_mb": feature_mb},
        "figure": "episodes/s per scorer (vectorised run_episodes)",
        "value": {k: v["episodes_per_s"] for k, v in per.items()},
        "reference": {"name": "per-episode Python loop, episodes/s", "value": {k: v["reference_episodes_per_s"] for k, v in per.items()}},
        "ratio": {k: v["ratio"] for k, v in per.items()},
        "scorers": per,
        "memory": {**mem, "feature_mb": feature_mb, "limit_mb": limit},
        "target": targets,
        "meets_target": bool(meets),
    })


if __name__ == "__main__":
    main()
