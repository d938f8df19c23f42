"""Is the seed project's head the right one? Head variants on identical episodes.

Trains siamese-l1 with random negatives (the seed's choice, the reference), siamese-l1 with
hard negatives (FAISS nearest other-class neighbours), siamese-mix, and the reference with
larger pair batches (64 groups of 5, or 40 groups of 8 images) on the same cache, then
scores the same 5-way 1-shot 15-query episodes with each (10,000; --quick: 1,000), cosine
alongside. Reports each accuracy with its CI and the paired difference to the reference.
Cache: --cache, default the Tiny-ImageNet 32 px run of the README (cache/runs/tiny32-classes);
--quick uses a 40-class random-weight cache built under cache/bench/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import ROOT, RESULTS, run_cache, write

from oneshot_bench.episodes import EpisodeConfig, run_episodes
from oneshot_bench.head import HeadConfig, load_head, train_head
from oneshot_bench.stats import mean_ci95

# name -> HeadConfig options; the last two change only how pairs are grouped into batches
# (head_speed.py measures their speed): what a faster epoch costs in accuracy.
VARIANTS = {"siamese-l1/random": {}, "siamese-l1/hard": {"negatives": "hard"}, "siamese-mix/random": {"head": "siamese-mix"},
            "siamese-l1/random, groups 5x64": {"groups_per_batch": 64},
            "siamese-l1/random, groups 8x40": {"group_size": 8, "groups_per_batch": 40}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "head_variants.json")
    p.add_argument("--cache", type=Path, default=None)
    args = p.parse_args()
    args.cache = run_cache(args.cache, args.quick)
    n = 1000 if args.quick else 10_000
    work = ROOT / "cache" / "bench" / "heads"
    per_episode, results, heads = {}, {}, {}
    for name, options in VARIANTS.items():
        out = work / f"{args.cache.stem}-{'-'.join(f'{k}{v}' for k, v in options.items()) or 'default'}.pt"
        t = time.perf_counter()
        train_head(HeadConfig(cache=args.cache, out=out, quiet=True, **options))
        train_s = time.perf_counter() - t
        meta = load_head(out)[1]
        heads[name] = {"path": str(out), "options": options, "train_s": train_s,
                       "best_epoch": meta["best_epoch"], "epochs_run": len(meta["history"])}
        pe = work / f"{out.stem}.per_episode.json"
        rep = run_episodes(EpisodeConfig(cache=args.cache, head=out, n_episodes=n, scorers=("pair-head", "cosine"),
                                         per_episode_out=pe, quiet=True))
        import json

        acc = json.loads(pe.read_text())
        per_episode[name] = np.array(acc["pair-head"])
        per_episode["cosine"] = np.array(acc["cosine"])
        r = {x["scorer"]: x for x in rep["results"]}["pair-head"]
        results[name] = {"accuracy": r["accuracy"], "ci95": r["ci95"], "n_episodes": r["n_episodes"], **heads[name]}
    ref = per_episode["siamese-l1/random"]
    for name in list(VARIANTS) + ["cosine"]:
        diff, ci = mean_ci95(per_episode[name] - ref)
        entry = results.setdefault(name, {})
        if name == "cosine":
            entry.update(dict(zip(("accuracy", "ci95"), mean_ci95(per_episode[name]))), n_episodes=n)
        entry.update(paired_difference_vs_reference=diff, paired_ci95=ci, significant=bool(abs(diff) > ci))
    write(args.out, {
        "benchmark": "head_variants",
        "quick": args.quick,
        "sizes": {"cache": str(args.cache), "n_episodes": n, "n_way": 5, "n_shot": 1, "n_query": 15, "pairs_per_class": 250},
        "figure": "5-way 1-shot pair-head accuracy per head variant",
        "value": {k: v["accuracy"] for k, v in results.items()},
        "reference": {"name": "siamese-l1 with random negatives (the seed project's head)", "value": results["siamese-l1/random"]["accuracy"]},
        "ratio": {k: v["accuracy"] / results["siamese-l1/random"]["accuracy"] for k, v in results.items()},
        "variants": results,
    })


if __name__ == "__main__":
    main()
