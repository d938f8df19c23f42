"""The HDF5 embedding cache: its schema, the `encode` stage, and the reader.

Schema (version 1), one file per (data set, split, trunk, image size):

  datasets
    features     (n, d) float32 or float16   pooled layer4 output, one row per image (with
                                              tta "flip": the mean of the image's and its mirror's;
                                              "flip-shift": the mean over 10 views, embed_images)
    labels       (n,)   int32                index into class_names
    class_names  (C,)   str
    class_roles  (C,)   str                  seen | val | unseen | unused
    image_split  (n,)   str                  train | val for seen-class images, "" otherwise
    source_ids   (n,)   str                  path relative to the folder root, or train/<i>, test/<i>
  attributes
    kind = "oneshot-bench/cache", schema_version = 1, complete (bool), n_done (int)
    config (JSON), encode_key, trunk_sha256, feature_space (JSON), feature_space_sha256,
    data_fingerprint (sha256 over class names, labels and source ids of the encoded images),
    n_skipped, skipped (JSON list of unreadable files), versions (JSON), timing (JSON)

The file is written as `<out>.partial` and renamed onto `<out>` only when complete, so a
killed run never leaves a file that looks finished; re-running resumes from `n_done`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from oneshot_bench.data import DataConfig, DataIndex, Images, open_source
from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.progress import Progress
from oneshot_bench.provenance import (
    canonical_json,
    check_writable,
    fingerprint_arrays,
    package_versions,
    sha256_text,
    stage_identity,
    to_jsonable,
)
from oneshot_bench.splits import SplitConfig, check_class_sizes, class_roles, image_split
from oneshot_bench.trunk import (
    LoadedTrunk,
    TrunkConfig,
    build_trunk,
    dataset_normalization,
    feature_space,
    fused_for_inference,
    resolve_image_size,
    to_input,
)

log = logging.getLogger(__name__)

CACHE_KIND = "oneshot-bench/cache"
SCHEMA_VERSION = 1
STR = h5py.string_dtype()


@dataclass(frozen=True)
class EncodeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    out: Path = Path("cache/features.h5")
    dtype: str = "float32"
    tta: str = "none"
    batch_size: int = 256
    chunk_size: int = 2048
    quiet: bool = False


TTA_KINDS = ("none", "flip", "flip-shift")
# flip-shift: the image and four copies moved by this many pixels (up, down, left, right, with
# reflected borders, like the training crops' reflect padding), each with its mirror: 10 views
TTA_SHIFT_PX = 2


def check_tta(tta: str) -> None:
    if tta not in TTA_KINDS:
        raise OneShotBenchError(f"unknown --tta {tta!r}; use {', '.join(TTA_KINDS[:-1])} or {TTA_KINDS[-1]}")


def _shifted_views(x: torch.Tensor) -> list[torch.Tensor]:
    """(b, 3, s, s) float32 -> the batch itself and four copies shifted by TTA_SHIFT_PX."""
    p, s = TTA_SHIFT_PX, x.shape[-1]
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    crops = [padded[..., dy : dy + s, dx : dx + s] for dy, dx in ((0, p), (2 * p, p), (p, 0), (p, 2 * p))]
    return [x] + [c.contiguous(memory_format=torch.channels_last) for c in crops]


@dataclass
class Cache:
    """A cache in memory. features: (n, d) float32 (float16 files are widened)."""

    path: Path
    features: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    class_roles: np.ndarray
    image_split: np.ndarray
    source_ids: np.ndarray
    attrs: dict

    @property
    def feature_space(self) -> dict:
        return self.attrs["feature_space"]

    @property
    def fingerprint(self) -> str:
        """Identity of this cache's content: data and feature space."""
        return sha256_text(self.attrs["data_fingerprint"] + self.attrs["feature_space_sha256"])

    def rows_with_roles(self, roles: tuple[str, ...]) -> np.ndarray:
        """Row indices of images whose class has one of `roles`, (m,) int64."""
        wanted = np.flatnonzero(np.isin(self.class_roles, list(roles)))
        return np.flatnonzero(np.isin(self.labels, wanted))


@dataclass
class PreparedData:
    """A data set decoded for a stage: index, class roles, images and their split."""

    index: DataIndex
    roles: np.ndarray
    images: Images
    split: np.ndarray
    image_size: int


def prepare_data(
    data: DataConfig, split: SplitConfig, trunk: LoadedTrunk, roles_to_load: tuple[str, ...] | None = None
) -> PreparedData:
    """Open the source, assign roles, decode the images of `roles_to_load` (all when None)."""
    index = open_source(data)
    roles = class_roles(index, split)
    classes = None if roles_to_load is None else np.flatnonzero(np.isin(roles, list(roles_to_load)))
    size = resolve_image_size(data.image_size, trunk, index.native_size(classes) if data.image_size is None else None)
    images = index.load(classes, size)
    minimum = {"seen": 2 if split.val_fraction > 0 else 1, "unseen": 2, "val": 2}
    if roles_to_load is not None:
        minimum = {k: v for k, v in minimum.items() if k in roles_to_load}
    check_class_sizes(images.labels, roles, index.class_names, minimum)
    return PreparedData(index, roles, images, image_split(images.labels, images.source_ids, roles, split), size)


def normalization_for(trunk: LoadedTrunk, prepared: PreparedData):
    """The trunk's own normalisation, else statistics of the seen train images."""
    if trunk.normalization is not None:
        return trunk.normalization
    rows = np.flatnonzero(prepared.split == "train")
    if len(rows) == 0:
        rows = np.arange(len(prepared.images.labels))
    return dataset_normalization(prepared.images.images[rows])


@torch.inference_mode()
def embed_images(model: torch.nn.Module, images: np.ndarray, norm, batch_size: int, fused: bool = False,
                 tta: str = "none") -> np.ndarray:
    """(n, s, s, 3) uint8 -> (n, 512) float32 pooled features, in batches.

    BatchNorm is folded into the convolutions first unless `fused` says it already is.
    tta "flip": each row is the mean of the features of the image and of its mirror image
    (the trunk trained on random flips, so both views are in-distribution; twice the work).
    tta "flip-shift": the mean over 10 views, the image and four copies shifted by
    TTA_SHIFT_PX, each with its mirror (the training crops' shifts; ten times the work)."""
    check_tta(tta)
    out = np.empty((len(images), 512), dtype=np.float32)
    if not fused:
        model = fused_for_inference(model)
    for start in range(0, len(images), batch_size):
        x = to_input(torch.from_numpy(images[start : start + batch_size]), norm)
        if tta == "none":
            feats = model(x)
        else:
            views = [x] if tta == "flip" else _shifted_views(x)
            feats = sum(model(v) + model(v.flip(3)) for v in views) / (2 * len(views))
        out[start : start + len(x)] = feats.numpy()
    return out


def encode(cfg: EncodeConfig, on_chunk: Callable[[int], None] | None = None) -> Path:
    """Encode every image of every class once into the HDF5 cache at `cfg.out`.

    Resumes a `<out>.partial` left by an interrupted run with the same encode key.
    `on_chunk(n_done)` is called after each chunk is durably written.
    Returns the path of the complete cache.
    """
    if cfg.dtype not in ("float32", "float16"):
        raise OneShotBenchError(f"--dtype {cfg.dtype!r} must be float32 or float16")
    if cfg.batch_size < 1:
        raise OneShotBenchError("--batch-size must be positive")
    check_tta(cfg.tta)  # before the data and trunk are loaded
    out = Path(cfg.out)
    check_writable(out)
    t0 = time.perf_counter()
    trunk = build_trunk(cfg.trunk)
    prepared = prepare_data(cfg.data, cfg.split, trunk)
    norm = normalization_for(trunk, prepared)
    t_load = time.perf_counter() - t0
    imgs = prepared.images
    data_fp = fingerprint_arrays(np.array(prepared.index.class_names, dtype=object), imgs.labels, imgs.source_ids)
    space = feature_space(trunk, prepared.image_size, norm, cfg.dtype, cfg.tta)
    config_json = canonical_json(to_jsonable(cfg))
    encode_key = sha256_text(canonical_json(stage_identity(cfg)) + data_fp + trunk.sha256)
    if out.exists():
        try:
            with h5py.File(out, "r") as f:
                if f.attrs.get("encode_key") == encode_key and f.attrs.get("complete"):
                    log.info("cache %s is already complete; nothing to do", out)
                    return out
        except OSError:
            pass
    partial = out.with_name(out.name + ".partial")
    n = len(imgs.labels)
    n_done = _resumable(partial, encode_key, n)
    if n_done == 0:
        _create(partial, cfg, prepared, imgs, space, encode_key, config_json, data_fp, trunk)
    else:
        log.info("resuming %s at image %d of %d", partial, n_done, n)
    chunk = max(cfg.batch_size, (cfg.chunk_size // cfg.batch_size) * cfg.batch_size)
    t1 = time.perf_counter()
    model = fused_for_inference(trunk.model, in_place=True)  # trunk.model is not used again
    with Progress("encode", total=n, quiet=cfg.quiet, unit="img") as bar:
        bar.advance(n_done)
        for start in range(n_done, n, chunk):
            feats = embed_images(model, imgs.images[start : start + chunk], norm, cfg.batch_size, fused=True, tta=cfg.tta)
            with h5py.File(partial, "r+") as f:
                f["features"][start : start + len(feats)] = feats.astype(cfg.dtype)
                f.attrs["n_done"] = start + len(feats)
                f.flush()
            bar.advance(len(feats))
            if on_chunk is not None:
                on_chunk(start + len(feats))
    t_encode = time.perf_counter() - t1
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = True
        f.attrs["timing"] = json.dumps(
            {"load_s": round(t_load, 3), "encode_s": round(t_encode, 3), "images_per_s": round((n - n_done) / max(t_encode, 1e-9), 1)}
        )
    os.replace(partial, out)
    log.info("wrote %s (%d images, %.1f img/s)", out, n, (n - n_done) / max(t_encode, 1e-9))
    return out


def _resumable(partial: Path, encode_key: str, n: int) -> int:
    """Images already encoded in a matching partial file, else 0 (and the file is dropped)."""
    if not partial.exists():
        return 0
    try:
        with h5py.File(partial, "r") as f:
            if f.attrs.get("encode_key") == encode_key and f["features"].shape[0] == n:
                return int(f.attrs.get("n_done", 0))
    except (OSError, KeyError):
        log.warning("dropping unreadable partial cache %s", partial)
    partial.unlink()
    return 0


def _create(partial, cfg, prepared, imgs, space, encode_key, config_json, data_fp, trunk) -> None:
    n = len(imgs.labels)
    try:
        f = h5py.File(partial, "w")
    except OSError as exc:
        raise OneShotBenchError(f"cannot write {partial}: {exc}") from None
    with f:
        f.create_dataset("features", shape=(n, 512), dtype=cfg.dtype, chunks=(min(n, 1024), 512))
        f.create_dataset("labels", data=imgs.labels.astype(np.int32))
        f.create_dataset("class_names", data=np.array(prepared.index.class_names, dtype=object), dtype=STR)
        f.create_dataset("class_roles", data=prepared.roles.astype(object), dtype=STR)
        f.create_dataset("image_split", data=prepared.split.astype(object), dtype=STR)
        f.create_dataset("source_ids", data=imgs.source_ids.astype(object), dtype=STR)
        f.attrs.update(
            {
                "kind": CACHE_KIND,
                "schema_version": SCHEMA_VERSION,
                "complete": False,
                "n_done": 0,
                "config": config_json,
                "encode_key": encode_key,
                "dataset": prepared.index.name,
                "trunk_sha256": trunk.sha256,
                "trunk_source": trunk.source,
                "feature_space": canonical_json(space),
                "feature_space_sha256": sha256_text(canonical_json(space)),
                "data_fingerprint": data_fp,
                "n_skipped": len(imgs.skipped),
                "skipped": json.dumps(imgs.skipped[:1000]),
                "versions": canonical_json(package_versions()),
                "timing": "{}",
            }
        )


def read_attrs(path: Path) -> dict:
    """Attributes of a cache file, JSON fields decoded; refuses foreign or partial files."""
    path = Path(path)
    if not path.is_file():
        raise OneShotBenchError(f"cache {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            shapes = {k: f[k].shape for k in f.keys()}
    except OSError:
        raise OneShotBenchError(f"{path} is not a readable HDF5 file") from None
    if attrs.get("kind") != CACHE_KIND:
        raise OneShotBenchError(f"{path} is not an oneshot-bench cache (HDF5 without its kind attribute)")
    if int(attrs.get("schema_version", -1)) != SCHEMA_VERSION:
        raise OneShotBenchError(f"{path} has cache schema {attrs.get('schema_version')}, expected {SCHEMA_VERSION}")
    if not attrs.get("complete"):
        raise OneShotBenchError(f"{path} is incomplete; re-run encode to finish it")
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        if k in ("config", "feature_space", "versions", "timing", "skipped"):
            v = json.loads(v)
        out[k] = v
    out["shapes"] = shapes
    return out


def load_cache(path: Path) -> Cache:
    """Read a complete cache into memory (features widened to float32)."""
    attrs = read_attrs(path)
    try:
        with h5py.File(path, "r") as f:
            cache = Cache(
                path=Path(path),
                features=f["features"][()].astype(np.float32, copy=False),
                labels=f["labels"][()].astype(np.int64),
                class_names=[s.decode() if isinstance(s, bytes) else s for s in f["class_names"][()]],
                class_roles=np.array(f["class_roles"].asstr()[()], dtype=object),
                image_split=np.array(f["image_split"].asstr()[()], dtype=object),
                source_ids=np.array(f["source_ids"].asstr()[()], dtype=object),
                attrs=attrs,
            )
    except (KeyError, OSError) as exc:
        raise OneShotBenchError(f"{path} is a corrupt cache ({exc})".replace("\n", " ")) from None
    return cache


def save_cache(
    path: Path,
    features: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    class_roles: np.ndarray,
    image_split: np.ndarray,
    source_ids: np.ndarray,
    feature_space: dict,
    config: dict | None = None,
) -> Path:
    """Write a complete cache from arrays (features from another tool, or synthetic tests).

    features: (n, d) float32/float16; labels: (n,) int; class_roles: (C,) str;
    image_split: (n,) str; source_ids: (n,) str. Written atomically.
    """
    from oneshot_bench.provenance import atomic_output

    features = np.asarray(features)
    space = dict(feature_space, dim=int(features.shape[1]), dtype=str(features.dtype))
    data_fp = fingerprint_arrays(np.array(class_names, dtype=object), np.asarray(labels, dtype=np.int64), np.asarray(source_ids, dtype=object))
    with atomic_output(Path(path)) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            f.create_dataset("class_names", data=np.array(class_names, dtype=object), dtype=STR)
            f.create_dataset("class_roles", data=np.asarray(class_roles, dtype=object), dtype=STR)
            f.create_dataset("image_split", data=np.asarray(image_split, dtype=object), dtype=STR)
            f.create_dataset("source_ids", data=np.asarray(source_ids, dtype=object), dtype=STR)
            f.attrs.update(
                {
                    "kind": CACHE_KIND,
                    "schema_version": SCHEMA_VERSION,
                    "complete": True,
                    "n_done": len(features),
                    "config": canonical_json(config or {}),
                    "encode_key": "",
                    "dataset": "arrays",
                    "trunk_sha256": space.get("trunk_sha256", ""),
                    "trunk_source": "external",
                    "feature_space": canonical_json(space),
                    "feature_space_sha256": sha256_text(canonical_json(space)),
                    "data_fingerprint": data_fp,
                    "n_skipped": 0,
                    "skipped": "[]",
                    "versions": canonical_json(package_versions()),
                    "timing": "{}",
                }
            )
    return Path(path)
