"""Provenance: package versions, fingerprints, atomic writes and checkpoint files.

Every artefact (HDF5 cache, trunk or head checkpoint, report) records its config, seed,
input fingerprints and package versions through the helpers here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from oneshot_bench.errors import OneShotBenchError

TRUNK_KIND = "oneshot-bench/trunk"
HEAD_KIND = "oneshot-bench/head"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, for provenance. Read from the installed
    distributions' metadata: importing torchvision or faiss just for a version string would
    cost a command that never uses them seconds and over 100 MB of memory."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import oneshot_bench

    def dist(*names: str) -> str:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return "missing"

    versions = {
        "python": platform.python_version(),
        "oneshot_bench": oneshot_bench.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchvision": dist("torchvision"),
        "h5py": dist("h5py"),
        "platform": platform.platform(),
        "faiss": dist("faiss-cpu", "faiss-gpu", "faiss"),
    }
    return versions


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and numpy scalars to plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


_NOT_IDENTITY = ("out", "quiet", "download", "json_out", "per_episode_out", "workers", "batch_size_episodes")


# Options added after artefacts already existed: at their "off" value they are left out of a
# stage's identity, so that artefacts made before the option existed keep their keys.
_OFF_VALUES = {"mixup": 0.0, "precision": "fp32", "crop_scale": 1.0, "tta": "none"}


def stage_identity(obj: Any, drop: tuple[str, ...] = ()) -> Any:
    """A config as JSON, less what cannot change a stage's result (output paths, progress
    bars, permission to download, the CIFAR root of a folder data set). Keys stages by content."""
    d = to_jsonable(obj)

    def walk(x):
        if isinstance(x, dict):
            out = {k: walk(v) for k, v in x.items()
                   if k not in _NOT_IDENTITY and k not in drop and not (k in _OFF_VALUES and v == _OFF_VALUES[k])}
            if str(out.get("dataset", "")).startswith("folder:"):
                out.pop("data_root", None)
            return out
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(d)


def canonical_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(obj: Any, n: int = 12) -> str:
    """Short stable hash of a JSON-able object (used to key pipeline stages)."""
    return sha256_text(canonical_json(obj))[:n]


def fingerprint_arrays(*parts: Any) -> str:
    """sha256 over numpy arrays and strings, order-sensitive."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            if part.dtype == object:
                h.update("\x00".join(map(str, part.tolist())).encode())
            else:
                h.update(np.ascontiguousarray(part).tobytes())
                h.update(str(part.dtype).encode())
        else:
            h.update(str(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def state_dict_sha256(state_dict: dict) -> str:
    """sha256 over parameter names and bytes: identifies a set of weights."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    A crash leaves `path` untouched (either absent or the previous complete file).
    """
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=parent)
        os.close(fd)
    except OSError as exc:
        raise OneShotBenchError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: Path) -> None:
    """Fail early (before long work) when `path` cannot be written."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OneShotBenchError(f"output path {path} is a directory; give a file name")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OneShotBenchError(f"cannot create directory {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise OneShotBenchError(f"cannot write to {parent}: permission denied")


def write_json(path: Path, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: Path, kind: str, meta: dict, tensors: dict) -> None:
    """Write a checkpoint atomically: {"kind", "meta" (JSON text), "tensors"}."""
    import torch

    payload = {"kind": kind, "meta": json.dumps(to_jsonable(meta)), "tensors": tensors}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, kind: str | None = None) -> tuple[dict, dict]:
    """Read a checkpoint written by `save_checkpoint`; returns (meta, tensors)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise OneShotBenchError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise OneShotBenchError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "kind" not in payload or "meta" not in payload:
        raise OneShotBenchError(f"{path} is not an oneshot-bench checkpoint")
    if kind is not None and payload["kind"] != kind:
        raise OneShotBenchError(f"{path} is a {payload['kind']} checkpoint, expected {kind}")
    return json.loads(payload["meta"]), payload["tensors"]
