"""encode's images/s against the bare trunk forward on the same tensors, in one run.

10,000 real Tiny-ImageNet images at 32x32 (--quick: 2,000). `encode` runs the full stage
(trunk build, normalisation, batched forward, chunked atomic HDF5 writes) on images that are
already decoded; the reference is `model(x)` in a loop over the same uint8 batches, already
normalised, same batch size and threads. The two are timed in alternation, best of 5 rounds
(--quick: 2), so that a slow spell of the machine touches both. Decoding the JPEGs is reported separately
(`decode_s`): it happens once per command, before either timing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import best_of_interleaved, parse, require_data, subset_folder, write

from oneshot_bench import cache as cache_mod
from oneshot_bench.cache import EncodeConfig, encode
from oneshot_bench.data import DataConfig, open_source
from oneshot_bench.splits import SplitConfig
from oneshot_bench.trunk import TrunkConfig, build_trunk, dataset_normalization, to_input


def main() -> None:
    args = parse(__doc__.splitlines()[0], "encode_speed")
    require_data(args.data)
    n_classes = 14 if args.quick else 67  # 150 images each: 2,100 / 10,050
    tmp = Path(tempfile.mkdtemp())
    folder = subset_folder(args.data, n_classes, tmp / "subset")
    batch = 256
    dcfg = DataConfig(dataset=f"folder:{folder}", image_size=32)
    t = time.perf_counter()
    images = open_source(dcfg).load(None, 32)
    decode_s = time.perf_counter() - t
    n = len(images.labels)

    # encode, with decoding taken out of the timed region (the same decoded arrays are reused)
    original = cache_mod.prepare_data
    prepared = original(dcfg, SplitConfig("ratio:0.8"), build_trunk(TrunkConfig(weights="none")))
    cache_mod.prepare_data = lambda *a, **k: prepared
    outs = iter(range(100))

    def run_encode():
        encode(EncodeConfig(data=dcfg, split=SplitConfig("ratio:0.8"), trunk=TrunkConfig(weights="none"),
                            out=tmp / f"c{next(outs)}.h5", batch_size=batch, quiet=True))

    model = build_trunk(TrunkConfig(weights="none")).model.to(memory_format=torch.channels_last).eval()
    norm = dataset_normalization(images.images)
    batches = [to_input(torch.from_numpy(images.images[s : s + batch]), norm) for s in range(0, n, batch)]

    def bare():
        with torch.inference_mode():
            for x in batches:
                model(x)

    repeats = 2 if args.quick else 5
    try:
        best = best_of_interleaved({"encode": run_encode, "bare": bare}, repeats)
    finally:
        cache_mod.prepare_data = original
    encode_s, bare_s = best["encode"], best["bare"]
    encode_ips, bare_ips = n / encode_s, n / bare_s
    write(args.out, {
        "benchmark": "encode_speed",
        "quick": args.quick,
        "sizes": {"images": n, "image_size": 32, "batch_size": batch, "threads": torch.get_num_threads(), "repeats": repeats},
        "figure": "encode images/s",
        "value": encode_ips,
        "reference": {"name": "bare trunk forward on pre-normalised tensors, images/s", "value": bare_ips},
        "ratio": encode_ips / bare_ips,
        "target": {"ratio_min": 0.9},
        "meets_target": bool(encode_ips / bare_ips >= 0.9),
        "decode_s": decode_s,
        "decode_images_per_s": n / decode_s,
        "encode_s": encode_s,
        "bare_s": bare_s,
        "feature_dtype": str(np.float32.__name__),
    })


if __name__ == "__main__":
    main()
