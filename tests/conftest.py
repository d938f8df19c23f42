"""Tiny seeded synthetic data sets: image folders and files in the official CIFAR pickle layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

SHARED_TINY = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tiny-imagenet-200"


def class_images(rng: np.random.Generator, n_classes: int, per_class: int, size: int, noise: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 images whose class shows as a colour and a stripe pattern."""
    colours = rng.integers(30, 226, (n_classes, 3))
    images, labels = [], []
    yy, xx = np.mgrid[:size, :size]
    for c in range(n_classes):
        freq = 1 + c % 4
        stripes = ((xx * freq // 4 + yy * (c // 4 % 3)) % 2)[..., None] * 40.0
        for _ in range(per_class):
            img = colours[c][None, None, :] + stripes + rng.normal(0, noise, (size, size, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels)


def write_folder(root: Path, n_classes: int = 6, per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = class_images(rng, n_classes, per_class, size)
    for k, (img, c) in enumerate(zip(images, labels)):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{k:04d}.png")
    return root


CIFAR100_FINE = None


def cifar100_names() -> tuple[list[str], list[str], list[int]]:
    """The 100 fine names, 20 coarse names and each fine class's coarse index (CIFAR-100 meta)."""
    coarse = {
        "aquatic_mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
        "flowers": "orchid poppy rose sunflower tulip", "food_containers": "bottle bowl can cup plate",
        "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper", "household_electrical_devices": "clock keyboard lamp telephone television",
        "household_furniture": "bed chair couch table wardrobe", "insects": "bee beetle butterfly caterpillar cockroach",
        "large_carnivores": "bear leopard lion tiger wolf", "large_man-made_outdoor_things": "bridge castle house road skyscraper",
        "large_natural_outdoor_scenes": "cloud forest mountain plain sea", "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
        "medium_mammals": "fox porcupine possum raccoon skunk", "non-insect_invertebrates": "crab lobster snail spider worm",
        "people": "baby boy girl man woman", "reptiles": "crocodile dinosaur lizard snake turtle",
        "small_mammals": "hamster mouse rabbit shrew squirrel", "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
        "vehicles_1": "bicycle bus motorcycle pickup_truck train", "vehicles_2": "lawn_mower rocket streetcar tank tractor",
    }
    coarse_names = sorted(coarse)
    fine = sorted(n for v in coarse.values() for n in v.split())
    of = {n: coarse_names.index(k) for k, v in coarse.items() for n in v.split()}
    return fine, coarse_names, [of[n] for n in fine]


def write_cifar100(root: Path, per_class_train: int = 3, per_class_test: int = 1, seed: int = 0) -> Path:
    """A tiny CIFAR-100 in the official python layout: cifar-100-python/{train,test,meta}."""
    fine, coarse_names, coarse_of = cifar100_names()
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        images, labels = class_images(rng, 100, per, 32)
        order = rng.permutation(len(labels))
        images, labels = images[order], labels[order]
        obj = {
            "filenames": [f"img_{split}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{split} batch",
            "fine_labels": labels.tolist(),
            "coarse_labels": [coarse_of[c] for c in labels],
            "data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072),
        }
        with open(base / split, "wb") as fh:
            pickle.dump(obj, fh)
    with open(base / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse_names}, fh)
    return root


@pytest.fixture
def folder_data(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "imgs")


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return write_cifar100(tmp_path / "cifar")
