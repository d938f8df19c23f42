"""Class splits (seen / val / unseen) and the seeded train/validation split of seen images."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oneshot_bench.data import DataIndex
from oneshot_bench.errors import OneShotBenchError

ROLES = ("seen", "val", "unseen", "unused")

# Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers".
CIFAR_FS_TEST = (
    "whale poppy rose sweet_pepper telephone bed table wardrobe leopard plain chimpanzee fox "
    "snail worm baby man woman bicycle pickup_truck rocket"
).split()
CIFAR_FS_VAL = (
    "beaver otter flatfish shark lamp television beetle butterfly sea camel cattle crab "
    "crocodile maple_tree motorcycle tractor"
).split()
# Oreshkin et al. 2018, "TADAM": FC100 splits CIFAR-100 by superclass.
FC100_TEST = ("aquatic_mammals", "insects", "medium_mammals", "people")
FC100_VAL = ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals")


@dataclass(frozen=True)
class SplitConfig:
    """How classes get roles and seen images get train/val.

    split: "ratio:F", "cifar-fs", "fc100" or "file:PATH".
    seen: absolute number of seen classes (overrides the ratio of a ratio split).
    seed: seeds the class permutation and the image split.
    val_fraction: share of each seen class's images held out for early stopping.
    """

    split: str = "ratio:0.8"
    seen: int | None = None
    seed: int = 0
    val_fraction: float = 0.1


def class_roles(index: DataIndex, cfg: SplitConfig) -> np.ndarray:
    """Role of each class, (n_classes,) object str in ROLES."""
    names = index.class_names
    n = len(names)
    roles = np.array(["unused"] * n, dtype=object)
    spec = cfg.split
    if spec.startswith("ratio:") or cfg.seen is not None:
        if cfg.seen is not None:
            if not 0 <= cfg.seen <= n:
                raise OneShotBenchError(f"--seen {cfg.seen} is outside 0..{n} (the data set has {n} classes)")
            n_seen = cfg.seen
        else:
            try:
                frac = float(spec[len("ratio:"):])
            except ValueError:
                raise OneShotBenchError(f"bad split {spec!r}: expected ratio:F with 0 <= F <= 1") from None
            if not 0.0 <= frac <= 1.0:
                raise OneShotBenchError(f"bad split {spec!r}: F must lie in [0, 1]")
            n_seen = int(round(frac * n))
        perm = np.random.default_rng(cfg.seed).permutation(n)
        roles[perm[:n_seen]] = "seen"
        roles[perm[n_seen:]] = "unseen"
        return roles
    if spec == "cifar-fs":
        return _named_roles(names, {"unseen": CIFAR_FS_TEST, "val": CIFAR_FS_VAL}, rest="seen", what="cifar-fs")
    if spec == "fc100":
        if index.superclass is None:
            raise OneShotBenchError("split fc100 needs CIFAR-100 superclasses; use --dataset cifar100")
        for i, sc in enumerate(index.superclass):
            roles[i] = "unseen" if sc in FC100_TEST else "val" if sc in FC100_VAL else "seen"
        return roles
    if spec.startswith("file:"):
        path = Path(spec[len("file:"):])
        try:
            spec_obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise OneShotBenchError(f"split file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise OneShotBenchError(f"split file {path} is not valid JSON ({exc})".replace("\n", " ")) from None
        if not isinstance(spec_obj, dict) or not set(spec_obj) <= {"seen", "val", "unseen"}:
            raise OneShotBenchError(f"split file {path} must be a JSON object with keys seen, val, unseen")
        return _named_roles(names, spec_obj, rest="unused", what=str(path))
    raise OneShotBenchError(f"unknown split {spec!r}; use ratio:F, cifar-fs, fc100 or file:PATH")


def _named_roles(names: list[str], by_role: dict, rest: str, what: str) -> np.ndarray:
    position = {name: i for i, name in enumerate(names)}
    roles = np.array([rest] * len(names), dtype=object)
    for role, members in by_role.items():
        for name in members:
            if name not in position:
                raise OneShotBenchError(f"split {what}: class {name!r} is not in the data set")
            if roles[position[name]] not in (rest,):
                raise OneShotBenchError(f"split {what}: class {name!r} has two roles")
            roles[position[name]] = role
    return roles


def _image_key(seed: int, source_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{source_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def image_split(labels: np.ndarray, source_ids: np.ndarray, roles: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """"train" / "val" for images of seen classes, "" for the others; (n,) object str.

    Each image's fate depends only on (seed, its source id, its class's images), so the
    split is the same whichever classes a command decodes.
    """
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise OneShotBenchError(f"--val-fraction {cfg.val_fraction} must lie in [0, 1)")
    out = np.array([""] * len(labels), dtype=object)
    keys = np.array([_image_key(cfg.seed, s) for s in source_ids.tolist()], dtype=np.uint64)
    for c in np.flatnonzero(roles == "seen"):
        rows = np.flatnonzero(labels == c)
        if len(rows) == 0:
            continue
        order = rows[np.argsort(keys[rows], kind="stable")]
        n_val = int(round(cfg.val_fraction * len(rows)))
        if cfg.val_fraction > 0 and len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)
        out[order[:n_val]] = "val"
        out[order[n_val:]] = "train"
    return out


def check_class_sizes(labels: np.ndarray, roles: np.ndarray, class_names: list[str], minimum: dict[str, int]) -> None:
    """Refuse classes left with too few images for their role (e.g. after unreadable files)."""
    counts = np.bincount(labels, minlength=len(roles))
    for c, role in enumerate(roles):
        need = minimum.get(role, 0)
        if counts[c] < need:
            raise OneShotBenchError(
                f"class {class_names[c]!r} ({role}) has {counts[c]} readable images; the split needs at least {need}"
            )
