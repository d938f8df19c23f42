"""`info FILE`: what an artefact (cache, trunk or head checkpoint, report) holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.provenance import HEAD_KIND, TRUNK_KIND, load_checkpoint


def describe(path: Path) -> dict:
    """A JSON-able summary of any oneshot-bench artefact; raises for anything else."""
    path = Path(path)
    if not path.is_file():
        raise OneShotBenchError(f"{path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return _describe_cache(path)
    if magic[:1] in (b"{", b"[") or path.suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except ValueError:
            raise OneShotBenchError(f"{path} is not valid JSON") from None
        if not isinstance(obj, dict) or not str(obj.get("kind", "")).startswith("oneshot-bench/"):
            raise OneShotBenchError(f"{path} is not an oneshot-bench report")
        out = {"file": str(path), "kind": obj["kind"], "config": obj.get("config"), "versions": obj.get("versions")}
        rows = obj.get("results", [])
        out["results"] = rows
        return out
    meta, tensors = load_checkpoint(path)
    kind = meta.get("kind")
    out = {"file": str(path), "kind": kind}
    if kind == TRUNK_KIND:
        keys = ("objective", "train_from", "augment", "stem", "image_size", "normalization", "best_epoch", "best",
                "trunk_sha256", "init_weights", "data_fingerprint", "dataset", "n_train_images", "n_val_images", "wall_s", "config", "versions")
        out.update({k: meta.get(k) for k in keys})
        out["epochs_run"] = len(meta.get("history", []))
    elif kind == HEAD_KIND:
        keys = ("head", "best_epoch", "final_val", "cache", "cache_fingerprint", "feature_space", "feature_space_sha256",
                "n_train_images", "n_val_images", "wall_s", "config", "versions")
        out.update({k: meta.get(k) for k in keys})
        out["epochs_run"] = len(meta.get("history", []))
    out["tensors"] = {k: len(v) for k, v in tensors.items()}
    return out


def _describe_cache(path: Path) -> dict:
    from oneshot_bench.cache import load_cache

    cache = load_cache(path)
    roles = {}
    for role in ("seen", "val", "unseen", "unused"):
        classes = np.flatnonzero(cache.class_roles == role)
        if len(classes):
            rows = np.isin(cache.labels, classes)
            roles[role] = {"classes": int(len(classes)), "images": int(rows.sum())}
            if role == "seen":
                roles[role]["train_images"] = int((rows & (cache.image_split == "train")).sum())
                roles[role]["val_images"] = int((rows & (cache.image_split == "val")).sum())
    a = cache.attrs
    return {
        "file": str(path),
        "kind": a["kind"],
        "schema_version": a["schema_version"],
        "shapes": {k: list(v) for k, v in a["shapes"].items()},
        "feature_dtype": str(a["feature_space"]["dtype"]),
        "roles": roles,
        "dataset": a.get("dataset"),
        "trunk_sha256": a["trunk_sha256"],
        "trunk_source": a.get("trunk_source"),
        "feature_space": a["feature_space"],
        "data_fingerprint": a["data_fingerprint"],
        "n_skipped": a["n_skipped"],
        "timing": a["timing"],
        "config": json.loads(a["config"]) if isinstance(a["config"], str) else a["config"],
        "versions": a["versions"],
    }
