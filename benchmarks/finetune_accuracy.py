"""Few-shot accuracy after fine-tuning from scratch on Tiny-ImageNet at 32x32.

160 seen / 40 unseen classes (--split ratio:0.8 --seed 0), --weights none --train-from all,
once per objective (classes, pairs) with the recipe below; --ablations adds its variants:
the first recipe (weight decay 5e-4), then on top of it mixup, bfloat16 steps spent on 38
epochs, the same with random resized crops, weight decays 1e-3, 2e-3 and 8e-3; the fp32
recipe that preceded the bf16 one (weight decay 4e-3, 24 epochs, encode --tta flip), its trunk
without flip (how every variant before it was encoded), its 30-epoch schedule with and
without early stopping; the bf16 recipe on 25 epochs (all that fitted into 30 minutes before
layer4 ran as matrix products), its trunk with 2 views (flip) instead of 10, and it trained
again with training seed 1; and the recipe trained again with training seed 1 (another
initialisation, batch order and augmentation; the same split and episodes).
--only a,b runs just those settings and merges them into the JSON at --out.
Each run is a full `oneshot-bench run` whose stages land in cache/runs/tiny32-<name>, so the
README's command (`make demo-offline`) reuses the classes run. Reports 5-way 1-shot
and 5-shot cosine accuracy (2,000 episodes, 15 queries, 95% CI) and the training wall time.
Reference: random weights (measured in this run) and the issue's figures for a plain
cross-entropy ResNet-18 (20 epochs, 32 px, standard stem): 40.5% 1-shot, 56.6% 5-shot.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from _common import ROOT, fail, parse, require_data, subset_folder, write

from oneshot_bench.data import DataConfig
from oneshot_bench.finetune import FinetuneConfig
from oneshot_bench.head import HeadConfig
from oneshot_bench.pipeline import RunConfig, run_pipeline
from oneshot_bench.splits import SplitConfig
from oneshot_bench.trunk import TrunkConfig

RECIPE = dict(stem="nomaxpool", train_from="all", lr=0.1, batch_size=128, label_smoothing=0.0, augment=True,
              precision="bf16", crop_scale=1.0, patience=None, weight_decay=4e-3, tta="flip-shift", training_seed=0)
# how the settings before the bf16 recipe were trained (fp32, early stopping on) and encoded
FP32 = {"precision": "fp32", "patience": 5, "tta": "flip"}
NO_TTA = {**FP32, "tta": "none"}  # how every setting before classes-noflip was encoded
# name -> (objective, epochs, changes to RECIPE); the ablations run with --ablations.
# patience None: no early stopping (the best epoch is still kept).
SETTINGS = {"classes": ("classes", 40, {}),
            "pairs": ("pairs", 15, {"weight_decay": 5e-4, **NO_TTA})}  # pairs: measured with the first recipe
ABLATIONS = {
    # measured against the first recipe, weight decay 5e-4
    "classes-wd5e-4": ("classes", 24, {"weight_decay": 5e-4, **NO_TTA}),
    "classes-mixup": ("classes", 24, {"weight_decay": 5e-4, "mixup": 0.4, **NO_TTA}),
    # bf16's speed spent on epochs
    "classes-bf16-38": ("classes", 38, {"weight_decay": 5e-4, **NO_TTA, "precision": "bf16", "patience": None}),
    # + resized crops
    "classes-bf16-38-rrc": ("classes", 38, {"weight_decay": 5e-4, **NO_TTA, "precision": "bf16", "patience": None,
                                            "crop_scale": 0.35}),
    "classes-wd1e-3": ("classes", 24, {"weight_decay": 1e-3, **NO_TTA}),  # twice the first recipe's
    "classes-wd2e-3": ("classes", 24, {"weight_decay": 2e-3, **NO_TTA}),  # four times (the recipe: eight times)
    "classes-wd8e-3": ("classes", 24, {"weight_decay": 8e-3, **NO_TTA}),  # sixteen times
    "classes-30": ("classes", 30, NO_TTA),  # the fp32 recipe on a 30-epoch schedule, early stopping (patience 5) on
    "classes-30-nopat": ("classes", 30, {**NO_TTA, "patience": None}),  # the same, early stopping off (best epoch kept)
    "classes-fp32-24": ("classes", 24, FP32),  # the recipe before bf16: fp32, 24 epochs, flip-averaged features
    "classes-noflip": ("classes", 24, NO_TTA),  # classes-fp32-24's trunk, features of the image alone
    "classes-30-nopat-flip": ("classes", 30, {**FP32, "patience": None}),  # classes-30-nopat's trunk, flip-averaged
    # the recipe on 25 epochs: what fitted into 30 minutes before layer4 ran as matrix products (trunk.GemmConv2d)
    "classes-25": ("classes", 25, {}),
    "classes-flip": ("classes", 25, {"tta": "flip"}),  # classes-25's trunk, features averaged over 2 views instead of 10
    # trained again with another initialisation, batch order and augmentation (same split, same episodes)
    "classes-25-seed1": ("classes", 25, {"training_seed": 1}),
    "classes-seed1": ("classes", 40, {"training_seed": 1}),
    "classes-48": ("classes", 48, {}),  # the recipe on 48 epochs: what else fits into the 30 minutes here
}
# 5-way 1-shot is also scored on this many times the episodes (the README run's 10,000, whose
# first 2,000 are the issue's): a figure near the target needs the narrower CI
MORE_EPISODES = 5
TARGET = {"five_way_one_shot": 0.5, "train_wall_s_max": 1800}  # issue #3's
REFERENCE_PLAIN_CE = {"five_way_one_shot": 0.405, "five_way_five_shot": 0.566, "source": "issue #3, 20 epochs, measured by the issue author"}


def run(objective: str, data: Path, out_dir: Path, epochs: int, n_episodes: int, weights_none_only: bool = False,
        changes: dict | None = None) -> dict:
    recipe = {**RECIPE, **(changes or {})}
    patience = recipe["patience"] or epochs
    cfg = RunConfig(
        data=DataConfig(dataset=f"folder:{data}", image_size=32),
        split=SplitConfig("ratio:0.8", seed=0),
        trunk=TrunkConfig(weights="none", stem=recipe["stem"], init_seed=recipe["training_seed"]),
        out_dir=out_dir,
        do_finetune=not weights_none_only,
        tta=recipe["tta"],
        finetune=FinetuneConfig(objective=objective, train_from=recipe["train_from"], epochs=epochs, patience=patience,
                                lr=recipe["lr"], weight_decay=recipe["weight_decay"], batch_size=recipe["batch_size"],
                                label_smoothing=recipe["label_smoothing"],
                                augment=recipe["augment"], mixup=recipe.get("mixup", 0.0), precision=recipe["precision"],
                                crop_scale=recipe["crop_scale"], seed=recipe["training_seed"]),
        head=HeadConfig(seed=0),
        n_way=(5,), n_shot=(1, 5), n_query=15, n_episodes=n_episodes, scorers=("cosine",), quiet=True,
    )
    report = run_pipeline(cfg)
    # the same stages (reused); only the episodes run
    more = run_pipeline(replace(cfg, n_shot=(1,), n_episodes=MORE_EPISODES * n_episodes))["results"][0]["results"][0]
    acc = {}
    for block in report["results"]:
        r = block["results"][0]
        acc[f"{r['n_way']}w{r['n_shot']}s"] = {"accuracy": r["accuracy"], "ci95": r["ci95"], "n_episodes": r["n_episodes"]}
    ft = report["stages"].get("finetune", {})
    return {
        "five_way_one_shot": acc["5w1s"],
        "five_way_five_shot": acc["5w5s"],
        "five_way_one_shot_more_episodes": {"accuracy": more["accuracy"], "ci95": more["ci95"], "n_episodes": more["n_episodes"]},
        "train_wall_s": ft.get("train_wall_s"),
        "recipe": recipe,
        "epochs": epochs,
        "epochs_run": len(ft.get("history", [])),
        "best_epoch": ft.get("best_epoch"),
        "run_dir": str(out_dir),
    }


def _meets_target(accuracy: float, train_wall_s: float | None) -> bool:
    return bool(accuracy >= TARGET["five_way_one_shot"] and (train_wall_s or 0) <= TARGET["train_wall_s_max"])


def _quick(changes: dict) -> dict:
    """--quick encodes 2 views (flip) where a setting encodes 10 (flip-shift): a fifth of the encode time."""
    return {**changes, "tta": "flip"} if {**RECIPE, **changes}["tta"] == "flip-shift" else changes


def main() -> None:
    def options(p) -> None:
        p.add_argument("--ablations", action="store_true", help="also run every variant of ABLATIONS")
        # the cache under cache/runs is not kept between clones, and each setting costs 25-55 minutes
        p.add_argument("--only", default=None,
                       help="comma-separated settings to (re)run, merged into the JSON already at --out")

    args = parse(__doc__.splitlines()[0], "finetune_accuracy", options)
    ablation, only = args.ablations, (args.only.split(",") if args.only else None)
    require_data(args.data)
    data, n_episodes, tag = args.data, 2000, "tiny32"
    if args.quick:  # same settings, one epoch each, 30 classes, and 2 views where a setting encodes 10
        data = subset_folder(args.data, 30, Path(tempfile.mkdtemp()) / "tiny30")
        n_episodes, tag = 300, "tiny32-quick"
    known = {k: (o, 1 if args.quick else e, _quick(c) if args.quick else c) for k, (o, e, c) in {**SETTINGS, **ABLATIONS}.items()}
    settings = {k: v for k, v in known.items() if k in SETTINGS or ablation}
    previous = {}
    if only is not None:
        unknown = sorted(set(only) - set(known))
        if unknown:
            fail(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        settings = {k: v for k, v in known.items() if k in only}
        if args.out.exists():
            old = json.loads(args.out.read_text())
            if old.get("quick") != args.quick:
                fail(f"{args.out} holds a {'quick' if old.get('quick') else 'full'} run; --only merges only into the same kind")
            previous = old.get("objectives", {})
    runs = ROOT / "cache" / "runs"
    random_weights = run("classes", data, runs / f"{tag}-random", 1, n_episodes, weights_none_only=True,
                         changes=_quick({}) if args.quick else None)
    results = {name: run(obj, data, runs / f"{tag}-{name}", epochs, n_episodes, changes=changes)
               for name, (obj, epochs, changes) in settings.items()}
    results = {**previous, **results}
    # None until the recipe itself has run (an --only run of variants into a new file)
    recipe_run = results.get("classes", {})
    best = recipe_run["five_way_one_shot"]["accuracy"] if recipe_run else None
    write(args.out, {
        "benchmark": "finetune_accuracy",
        "quick": args.quick,
        "sizes": {"classes": 30 if args.quick else 200, "split": "ratio:0.8 seed 0", "image_size": 32,
                  "n_episodes": n_episodes, "n_query": 15, "scorer": "cosine",
                  "epochs": {k: v["epochs"] for k, v in results.items()}},
        "recipe": RECIPE,
        "figure": "5-way 1-shot cosine accuracy, objective classes",
        "value": best,
        "reference": {"random_weights": random_weights["five_way_one_shot"]["accuracy"], "plain_ce_issue": REFERENCE_PLAIN_CE},
        "ratio_vs_random_weights": None if best is None else best / random_weights["five_way_one_shot"]["accuracy"],
        "target": TARGET,
        # on the protocol (n_episodes); and the same on MORE_EPISODES times the episodes
        "meets_target": best is not None and _meets_target(best, recipe_run["train_wall_s"]),
        "meets_target_more_episodes": None if best is None or "five_way_one_shot_more_episodes" not in recipe_run else
        _meets_target(recipe_run["five_way_one_shot_more_episodes"]["accuracy"], recipe_run["train_wall_s"]),
        "random_weights": random_weights,
        "objectives": results,
    })


if __name__ == "__main__":
    main()
