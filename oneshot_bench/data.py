"""Data sources: CIFAR-10/100 in the official python pickle layout, and image folders.

A source is opened into a `DataIndex` (class names, labels, source identities: cheap, no
pixels). `DataIndex.load` decodes the images of chosen classes once into uint8 arrays
(n, size, size, 3), so that later stages never touch files again.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.provenance import fingerprint_arrays

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

CIFAR_DIRS = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py"}


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from.

    dataset: "cifar100", "cifar10" or "folder:PATH".
    data_root: directory holding `cifar-100-python/` (or `cifar-10-batches-py/`).
    download: allow torchvision to fetch (and checksum) the CIFAR archive.
    image_size: side in pixels the trunk sees; None means the data's native size.
    """

    dataset: str = "cifar100"
    data_root: Path = Path("data")
    download: bool = False
    image_size: int | None = None


@dataclass
class Images:
    """Decoded images of some classes.

    images: (n, s, s, 3) uint8; labels: (n,) int64 class index into the DataIndex;
    source_ids: (n,) object str; skipped: source ids that failed to decode.
    """

    images: np.ndarray
    labels: np.ndarray
    source_ids: np.ndarray
    skipped: list[str] = field(default_factory=list)


@dataclass
class DataIndex:
    """What a data set holds, without pixels.

    labels: (n,) int64; source_ids: (n,) object str (path relative to the folder root,
    or "train/<i>" / "test/<i>" for CIFAR); superclass: per class, the CIFAR-100 coarse
    label name (None for other sources).
    """

    name: str
    class_names: list[str]
    labels: np.ndarray
    source_ids: np.ndarray
    superclass: list[str] | None
    _decode: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    _probe: Callable[[int], int | None]

    def native_size(self, classes: np.ndarray | None = None) -> int | None:
        """Side of the first readable image among `classes` (all when None); reads one file."""
        rows = np.arange(len(self.labels)) if classes is None else np.flatnonzero(np.isin(self.labels, classes))
        for row in rows[:16].tolist():
            size = self._probe(row)
            if size is not None:
                return size
        return None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> np.ndarray:
        """Images per class, (n_classes,) int64."""
        return np.bincount(self.labels, minlength=self.n_classes)

    def fingerprint(self) -> str:
        """Hash over class names, labels and source identities."""
        return fingerprint_arrays(np.array(self.class_names, dtype=object), self.labels, self.source_ids)

    def load(self, classes: np.ndarray | None, size: int) -> Images:
        """Decode the images of `classes` (all when None) to (n, size, size, 3) uint8.

        Unreadable files are skipped, logged by name and listed in `Images.skipped`.
        Images of other classes are never read.
        """
        rows = np.arange(len(self.labels)) if classes is None else np.flatnonzero(np.isin(self.labels, classes))
        images, ok = self._decode(rows, size)
        skipped = [str(s) for s in self.source_ids[rows[~ok]]]
        for sid in skipped:
            log.warning("skipped unreadable image %s", sid)
        rows = rows[ok]
        return Images(images=images[ok], labels=self.labels[rows], source_ids=self.source_ids[rows], skipped=skipped)


def open_source(cfg: DataConfig) -> DataIndex:
    """Open `cfg.dataset`; raises OneShotBenchError when it is missing or malformed."""
    if cfg.dataset in CIFAR_DIRS:
        return _open_cifar(cfg)
    if cfg.dataset.startswith("folder:"):
        return _open_folder(Path(cfg.dataset[len("folder:"):]))
    raise OneShotBenchError(f"unknown dataset {cfg.dataset!r}; use cifar100, cifar10 or folder:PATH")


# --- CIFAR ------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except FileNotFoundError:
        raise OneShotBenchError(f"missing CIFAR file {path}") from None
    except Exception as exc:
        raise OneShotBenchError(f"{path} is not a CIFAR pickle ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise OneShotBenchError(f"{path} is not a CIFAR pickle (no dict inside)")
    return obj


def _cifar_download(dataset: str, root: Path) -> None:
    """Fetch the official archive through torchvision, which verifies its md5."""
    from torchvision import datasets

    cls = datasets.CIFAR100 if dataset == "cifar100" else datasets.CIFAR10
    log.info("downloading %s to %s", dataset, root)
    try:
        cls(root=str(root), train=True, download=True)
    except Exception as exc:
        reason = str(exc).replace("\n", " ")[:160]
        raise OneShotBenchError(
            f"download of {dataset} into {root} failed ({reason}); offline, run on a local image folder instead: "
            f"oneshot-bench run --dataset folder:PATH --image-size 32 --weights none --train-from all (see README, or make demo-offline)"
        ) from None


def _open_cifar(cfg: DataConfig) -> DataIndex:
    root = Path(cfg.data_root)
    base = root / CIFAR_DIRS[cfg.dataset]
    if not base.is_dir() and cfg.download:
        _cifar_download(cfg.dataset, root)
    if not base.is_dir():
        raise OneShotBenchError(
            f"{cfg.dataset} not found at {base}: pass --download to fetch it (checksum verified), "
            f"or point --data-root at a directory holding {CIFAR_DIRS[cfg.dataset]}/ "
            f"(offline? try --dataset folder:PATH on a local image folder)"
        )
    if cfg.dataset == "cifar100":
        parts = [("train", _unpickle(base / "train")), ("test", _unpickle(base / "test"))]
        meta = _unpickle(base / "meta")
        label_key, names = "fine_labels", meta.get("fine_label_names")
        coarse_names = meta.get("coarse_label_names")
    else:
        parts = [(f"data_batch_{i}", _unpickle(base / f"data_batch_{i}")) for i in range(1, 6)]
        parts.append(("test_batch", _unpickle(base / "test_batch")))
        meta = _unpickle(base / "batches.meta")
        label_key, names, coarse_names = "labels", meta.get("label_names"), None
    if names is None:
        raise OneShotBenchError(f"{base} meta file has no class names")
    data, labels, ids, coarse = [], [], [], []
    for split, part in parts:
        try:
            arr = np.asarray(part["data"], dtype=np.uint8)
            lab = np.asarray(part[label_key], dtype=np.int64)
        except KeyError as exc:
            raise OneShotBenchError(f"{base}/{split} lacks key {exc.args[0]!r}") from None
        if arr.ndim != 2 or arr.shape[1] != 3072 or len(arr) != len(lab):
            raise OneShotBenchError(f"{base}/{split}: data must be N x 3072 uint8 with N labels")
        data.append(arr)
        labels.append(lab)
        prefix = "train" if split.startswith(("train", "data_batch")) else "test"
        offset = sum(len(d) for d in data[:-1]) if prefix == "train" and cfg.dataset == "cifar10" else 0
        ids.extend(f"{prefix}/{offset + i}" for i in range(len(arr)))
        if coarse_names is not None:
            coarse.append(np.asarray(part["coarse_labels"], dtype=np.int64))
    pixels = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels_all = np.concatenate(labels)
    if labels_all.min() < 0 or labels_all.max() >= len(names):
        raise OneShotBenchError(f"{base}: labels out of range for {len(names)} classes")
    superclass = None
    if coarse_names is not None:
        coarse_all = np.concatenate(coarse)
        superclass = [""] * len(names)
        for fine, c in zip(labels_all.tolist(), coarse_all.tolist()):
            superclass[fine] = coarse_names[c]

    def decode(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        return resize_uint8(pixels[rows], size), np.ones(len(rows), dtype=bool)

    return DataIndex(
        name=cfg.dataset,
        class_names=[str(n) for n in names],
        labels=labels_all,
        source_ids=np.array(ids, dtype=object),
        superclass=superclass,
        _decode=decode,
        _probe=lambda row: 32,
    )


def resize_uint8(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Resize (n, h, w, 3) uint8 to (n, size, size, 3) uint8, antialiased bilinear."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


# --- image folders ----------------------------------------------------------------------


def _open_folder(root: Path) -> DataIndex:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise OneShotBenchError(f"image folder {root} does not exist (expected one sub-folder per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise OneShotBenchError(f"image folder {root} has no class sub-folders")
    labels, ids = [], []
    for ci, cdir in enumerate(class_dirs):
        files = sorted(
            p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        ids.extend(str(p.relative_to(root)) for p in files)
        labels.extend([ci] * len(files))
    if not ids:
        raise OneShotBenchError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    source_ids = np.array(ids, dtype=object)

    def decode(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        out = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
        ok = np.zeros(len(rows), dtype=bool)
        for k, row in enumerate(rows.tolist()):
            try:
                with Image.open(root / source_ids[row]) as img:
                    img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")
                    if img.size != (size, size):
                        img = img.resize((size, size), Image.BILINEAR)
                    out[k] = np.asarray(img, dtype=np.uint8)
                ok[k] = True
            except Exception:  # PIL raises many types for broken files; each is reported by name
                ok[k] = False
        return out, ok

    return DataIndex(
        name=f"folder:{root}",
        class_names=[p.name for p in class_dirs],
        labels=np.array(labels, dtype=np.int64),
        source_ids=source_ids,
        superclass=None,
        _decode=decode,
        _probe=lambda row: _probe_size(root / source_ids[row]),
    )


def _probe_size(path: Path) -> int | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return max(img.size)
    except Exception:
        return None
