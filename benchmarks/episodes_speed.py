"""Episode throughput per scorer against a per-episode Python loop, in one run; peak memory.

Ours: `run_episodes` with one scorer at a time on 10,000 5-way 1-shot 15-query episodes
(--quick: 2,000), timed as the run's wall time: sampling, scorer preparation (the pool's
Gram matrix, the head's embeddings) and scoring, what `oneshot-bench episodes --scorers X`
spends after loading the cache ("ratio"); and its scoring time alone against the
reference's scoring loop alone ("scoring_only_ratio": steady-state throughput, one-off
preparation and sampling excluded on both sides). Reference: the usual few-shot evaluation loop on the same
cached features, one episode at a time as easyfsl's TaskSampler + evaluate do it
(random.sample of classes and images, labels remapped, prototypes as a per-class mean,
scores, `.item()` per episode), timed on 500 episodes (--quick: 200) and compared as
episodes/s. Peak memory: the growth of peak RSS from before the cache is loaded to the end
of a run with every scorer, in a fresh interpreter.
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


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries the
    parent's high-water mark into a child across vfork/exec, so the child of a benchmark that
    had already trained a head reported the parent's peak (up to 531 MB where the child's own
    was 290 MB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(cache_path: str, head_path: str, n: int, q) -> None:
    import faiss  # noqa: F401  (libraries imported before the baseline is read)
    import h5py  # noqa: F401

    before = rss_mb()
    t = time.perf_counter()
    run_episodes(EpisodeConfig(cache=Path(cache_path), head=Path(head_path), n_episodes=n, quiet=True))
    peak = peak_rss_mb()
    q.put({"peak_growth_mb": peak - before, "rss_before_mb": before, "seconds": time.perf_counter() - t})


def reference_loop(cache, head, n: int, scorer: str, n_way: int = 5, n_shot: int = 1, n_query: int = 15) -> tuple[float, float]:
    """Seconds (sampling, scoring) for n episodes the usual way of few-shot code: easyfsl's
    TaskSampler draws each episode with `random.sample`, the collate step remaps labels, the
    method computes prototypes per class and scores the queries, and the loop reads the
    accuracy back. Sampling is timed apart so that scoring alone can be compared too."""
    import random

    import torch.nn.functional as F

    rows = cache.rows_with_roles(("unseen",))
    feats = torch.from_numpy(cache.features)
    items_per_label = {int(c): rows[cache.labels[rows] == c].tolist() for c in np.unique(cache.labels[rows])}
    mean = feats[torch.from_numpy(cache.rows_with_roles(("seen",)))].mean(0)
    rnd = random.Random(0)
    t = time.perf_counter()
    episodes = []
    for _ in range(n):
        labels = rnd.sample(sorted(items_per_label), n_way)
        items = [i for c in labels for i in rnd.sample(items_per_label[c], n_shot + n_query)]
        y = torch.tensor([labels.index(int(cache.labels[i])) for i in items]).view(n_way, n_shot + n_query)
        episodes.append((torch.tensor(items), y))
    sampling_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        for items, y in episodes:
            x = feats[items].view(n_way, n_shot + n_query, -1)
            sup, qry = x[:, :n_shot].reshape(-1, x.shape[-1]), x[:, n_shot:].reshape(-1, x.shape[-1])
            sup_y, qry_y = y[:, :n_shot].reshape(-1), y[:, n_shot:].reshape(-1)
            if scorer == "pair-head":  # the head on every (query, support) pair, mean over shots
                prob = torch.sigmoid(head(qry.repeat_interleave(len(sup), 0), sup.repeat(len(qry), 1))).view(len(qry), -1)
                scores = torch.stack([prob[:, sup_y == k].mean(1) for k in range(n_way)], 1)
            else:
                if scorer == "cosine":
                    sup, qry = F.normalize(sup, dim=1), F.normalize(qry, dim=1)
                elif scorer == "cl2n":
                    sup, qry = F.normalize(sup - mean, dim=1), F.normalize(qry - mean, dim=1)
                protos = torch.cat([sup[torch.nonzero(sup_y == k)].mean(0) for k in range(n_way)])
                if scorer == "cosine":
                    scores = qry @ F.normalize(protos, dim=1).T
                else:
                    scores = -torch.cdist(qry, protos) ** 2
            (scores.argmax(1) == qry_y).sum().item() / len(qry_y)
    return sampling_s, time.perf_counter() - t


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
    per = {}
    for name in ("pair-head", "cosine", "l2", "cl2n"):
        cfg = EpisodeConfig(cache=cache.path, head=head_path if name == "pair-head" else None, scorers=(name,), n_episodes=n, quiet=True)
        report = min((run_episodes(cfg) for _ in range(3)), key=lambda rep: rep["wall_s"])  # best of 3: noisy machine
        r = report["results"][0]
        ref_sample_s, ref_score_s = min((reference_loop(cache, head, n_ref, name) for _ in range(2)), key=sum)
        ours_eps, ref_eps = n / report["wall_s"], n_ref / (ref_sample_s + ref_score_s)
        per[name] = {"seconds": report["wall_s"], "episodes_per_s": ours_eps, "reference_episodes_per_s": ref_eps,
                     "ratio": ours_eps / ref_eps,
                     "scoring_seconds": r["wall_s"], "reference_scoring_seconds_for_n_ref": ref_score_s,
                     "scoring_ratio": (n / r["wall_s"]) / (n_ref / ref_score_s),
                     "accuracy": r["accuracy"], "ci95": r["ci95"]}
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
        "scoring_only_ratio": {k: v["scoring_ratio"] for k, v in per.items()},
        "scorers": per,
        "memory": {**mem, "feature_mb": feature_mb, "limit_mb": limit},
        "target": targets,
        "meets_target": bool(meets),
    })


if __name__ == "__main__":
    main()
