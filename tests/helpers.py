"""Synthetic feature caches for head and episode tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oneshot_bench.cache import save_cache

SPACE = {"trunk_sha256": "a" * 64, "stem": "imagenet", "image_size": 32,
         "normalization": {"name": "dataset", "mean": [0.5] * 3, "std": [0.25] * 3}}


def cluster_cache(path: Path, n_classes: int = 12, per_class: int = 20, dim: int = 32, spread: float = 0.05,
                  seen: int = 6, seed: int = 0, shuffle_labels: bool = False, space: dict | None = None) -> Path:
    """Classes as tight clusters around random unit centres; the first `seen` classes are seen."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), per_class)
    feats = (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)
    if shuffle_labels:
        labels = rng.permutation(labels)
    roles = np.array(["seen"] * seen + ["unseen"] * (n_classes - seen), dtype=object)
    split = np.array(["" for _ in labels], dtype=object)
    for c in range(seen):
        rows = np.flatnonzero(labels == c)
        split[rows] = "train"
        split[rows[: max(1, len(rows) // 4)]] = "val"
    ids = np.array([f"c{labels[i]}/img{i}.png" for i in range(len(labels))], dtype=object)
    return save_cache(path, feats, labels, [f"class{c}" for c in range(n_classes)], roles, split, ids, space or SPACE)
