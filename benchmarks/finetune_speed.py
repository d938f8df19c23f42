"""finetune's epoch time against the seed project's way, in one run, at layer4 and at all.

Both sides train on the same batches of Tiny-ImageNet seen classes at 32 px with the pairs
objective (same pairs, same resolution, same trainable layers, no augmentation on either
side). Ours embeds each image of a batch once and forms the pairs among the embeddings; at
--train-from layer4 it also runs only layer4 on the cached layer3 output (the stem cache).
The reference runs the full network on both images of every pair, as the seed project did.
Each side is timed on a fixed number of batches and scaled to a full epoch; the one-off
stem-cache build is reported separately and also charged to one epoch in a second ratio.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import parse, require_data, subset_folder, write

from oneshot_bench.cache import prepare_data
from oneshot_bench.data import DataConfig
from oneshot_bench.finetune import FinetuneConfig, StemCache, Trainer, freeze, make_optimizer, set_train_mode
from oneshot_bench.head import PairHead
from oneshot_bench.splits import SplitConfig
from oneshot_bench.trunk import TrunkConfig, build_trunk, dataset_normalization, to_input


def main() -> None:
    args = parse(__doc__.splitlines()[0], "finetune_speed")
    require_data(args.data)
    n_classes = 40 if args.quick else 200
    data = subset_folder(args.data, n_classes, Path(tempfile.mkdtemp()) / "sub") if args.quick else args.data
    trunk0 = build_trunk(TrunkConfig(weights="none"))
    prepared = prepare_data(DataConfig(dataset=f"folder:{data}", image_size=32), SplitConfig("ratio:0.8", seed=0), trunk0,
                            roles_to_load=("seen",))
    train = prepared.split == "train"
    images = prepared.images.images[train]
    seen = np.flatnonzero(prepared.roles == "seen")
    local = np.full(prepared.index.n_classes, -1)
    local[seen] = np.arange(len(seen))
    labels = local[prepared.images.labels[train]]
    norm = dataset_normalization(images)
    n_ours, n_ref = (4, 2) if args.quick else (40, 8)
    out, alt = {}, {}
    default_group = FinetuneConfig().group_size
    for group_size, train_from in ((default_group, "layer4"), (default_group, "all"), (4, "layer4"), (4, "all")):
        cfg = FinetuneConfig(train_from=train_from, augment=False, objective="pairs", batch_size=128, seed=0, group_size=group_size)
        model = build_trunk(TrunkConfig(weights="none")).model.to(memory_format=torch.channels_last)
        freeze(model, train_from)
        head = PairHead(512)
        t = time.perf_counter()
        stem = StemCache(model, train_from, images, norm, None, 8 << 30) if train_from != "all" else None
        stem_s = time.perf_counter() - t
        trainer = Trainer(cfg, model, head, norm, images, labels, stem)
        batches = trainer.epoch_batches(np.arange(len(labels)), np.random.default_rng(0))
        opt = make_optimizer(cfg, trainer)  # the library's optimiser, on both sides
        set_train_mode(model, train_from)
        head.train()

        def ours(b):
            loss = trainer.batch_loss(b[0], b[1], None)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()

        def seed_way(b):
            idx, (i, j, y) = b
            f1 = model(to_input(torch.from_numpy(images[idx[i]]), norm))
            f2 = model(to_input(torch.from_numpy(images[idx[j]]), norm))
            loss = F.binary_cross_entropy_with_logits(head.pair_logits(head.embed(f1), head.embed(f2)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()

        ours(batches[0])  # warm-up
        t = time.perf_counter()
        for b in batches[1 : 1 + n_ours]:
            ours(b)
        ours_per_batch = (time.perf_counter() - t) / n_ours
        seed_way(batches[0])
        t = time.perf_counter()
        for b in batches[1 : 1 + n_ref]:
            seed_way(b)
        ref_per_batch = (time.perf_counter() - t) / n_ref
        ours_epoch, ref_epoch = ours_per_batch * len(batches), ref_per_batch * len(batches)
        (out if group_size == default_group else alt)[train_from] = {
            "epoch_s": ours_epoch,
            "reference_epoch_s": ref_epoch,
            "ratio": ref_epoch / ours_epoch,
            "stem_cache_build_s": stem_s,
            "ratio_with_stem_cache_build_in_one_epoch": ref_epoch / (ours_epoch + stem_s),
            "batches_per_epoch": len(batches),
            "pairs_per_epoch": int(sum(len(b[1][2]) for b in batches)),
            "images_embedded_per_epoch_ours": int(sum(len(b[0]) for b in batches)),
            "images_embedded_per_epoch_reference": int(2 * sum(len(b[1][2]) for b in batches)),
            "timed_batches": {"ours": n_ours, "reference": n_ref},
        }
    write(args.out, {
        "benchmark": "finetune_speed",
        "quick": args.quick,
        "sizes": {"seen_classes": int(len(seen)), "train_images": int(len(labels)), "image_size": 32, "batch_size_images": 128,
                  "pairs_per_class": 250, "objective": "pairs", "stem": "imagenet", "threads": torch.get_num_threads()},
        "figure": "finetune epoch wall time (s)",
        "value": {k: v["epoch_s"] for k, v in out.items()},
        "reference": {"name": "seed's way: both images of every pair through the full network, epoch s",
                      "value": {k: v["reference_epoch_s"] for k, v in out.items()}},
        "ratio": {k: v["ratio"] for k, v in out.items()},
        "target": {"layer4_ratio_min": 20, "all_ratio_min": 5},
        "meets_target": bool(out["layer4"]["ratio"] >= 20 and out["all"]["ratio"] >= 5),
        "modes": out,
        "group_size": default_group,
        "with_group_size_4": {"ratio": {k: v["ratio"] for k, v in alt.items()}, "modes": alt},
    })


if __name__ == "__main__":
    main()
