"""FAISS candidate retrieval for the pair head under the seed protocol (K = all unseen classes).

One support per unseen class, every other unseen image a query, 100 support draws
(--quick: 10). For m = 1, 5, 10 and all candidate supports per query: retrieval recall
(share of queries whose true class is among the candidates), accuracy with CI, and the
scoring time; the reference is m = all (the head scores every support).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import ROOT, RESULTS, fail, run_cache, run_stage_path, write

from oneshot_bench.episodes import EpisodeConfig, run_episodes
from oneshot_bench.head import HeadConfig, train_head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "candidates.json")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--head", type=Path, default=None)
    args = p.parse_args()
    args.cache = run_cache(args.cache, args.quick)
    if args.head is None:
        found = run_stage_path("train-head") if not args.quick else None
        args.head = found if found is not None and found.exists() else ROOT / "cache/bench" / f"{args.cache.stem}-head.pt"
        if not args.head.exists():
            train_head(HeadConfig(cache=args.cache, out=args.head, epochs=3 if args.quick else 30, quiet=True))
    elif not args.head.is_file():
        fail(f"head {args.head} does not exist")
    n = 10 if args.quick else 100
    rep = run_episodes(EpisodeConfig(cache=args.cache, head=args.head, protocol="seed", n_episodes=n,
                                     scorers=("pair-head", "cosine"), candidates=(1, 5, 10, 0), quiet=True))
    rows = {r["scorer"]: r for r in rep["results"]}
    full = rows["pair-head"]
    sweep = {}
    for name, r in rows.items():
        if r["base_scorer"] != "pair-head":
            continue
        sweep[str(r["candidates"])] = {"recall": 1.0 if r["recall"] is None else r["recall"], "accuracy": r["accuracy"],
                                       "ci95": r["ci95"], "seconds": r["wall_s"], "speedup_vs_all": full["wall_s"] / max(r["wall_s"], 1e-9)}
    write(args.out, {
        "benchmark": "candidates",
        "quick": args.quick,
        "sizes": {"cache": str(args.cache), "head": str(args.head), "protocol": "seed", "n_episodes": n,
                  "n_way": full["n_way"], "queries_per_episode": full["n_query"] * full["n_way"]},
        "figure": "pair-head accuracy and time per candidate count m",
        "value": sweep,
        "reference": {"name": "m = all (head scores every support)", "accuracy": full["accuracy"], "seconds": full["wall_s"]},
        "ratio": {m: v["speedup_vs_all"] for m, v in sweep.items()},
        "cosine": {"accuracy": rows["cosine"]["accuracy"], "ci95": rows["cosine"]["ci95"], "seconds": rows["cosine"]["wall_s"]},
    })


if __name__ == "__main__":
    main()
