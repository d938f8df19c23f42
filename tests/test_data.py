import json

import numpy as np
import pytest
from PIL import Image

from conftest import cifar100_names, write_folder
from oneshot_bench.data import DataConfig, open_source
from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.splits import CIFAR_FS_TEST, CIFAR_FS_VAL, SplitConfig, class_roles, image_split


def test_cifar100_reader_counts_labels_and_ids(cifar_root):
    index = open_source(DataConfig(dataset="cifar100", data_root=cifar_root))
    assert index.n_classes == 100
    assert len(index.labels) == 100 * 4  # 3 train + 1 test per class, concatenated
    assert np.all(index.counts() == 4)
    assert index.source_ids[0] == "train/0" and index.source_ids[300] == "test/0"
    fine, coarse, coarse_of = cifar100_names()
    assert index.class_names == fine
    assert index.superclass[fine.index("whale")] == "aquatic_mammals"
    imgs = index.load(None, 32)
    assert imgs.images.shape == (400, 32, 32, 3) and imgs.images.dtype == np.uint8
    # pixels come back exactly as written in the pickle (row-major CHW -> HWC)
    import pickle

    with open(cifar_root / "cifar-100-python" / "train", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    assert np.array_equal(imgs.images[0], raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert imgs.labels[0] == raw["fine_labels"][0]


def test_cifar_missing_is_one_line_error_naming_path_and_ways_out(tmp_path):
    with pytest.raises(OneShotBenchError) as err:
        open_source(DataConfig(dataset="cifar100", data_root=tmp_path / "nowhere"))
    msg = str(err.value)
    assert "\n" not in msg and "cifar-100-python" in msg and "--download" in msg and "--data-root" in msg


def test_folder_modes_converted_and_unreadable_skipped(tmp_path):
    root = tmp_path / "f"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    Image.new("L", (20, 10), 128).save(root / "a" / "gray.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(root / "a" / "rgba.png")
    Image.new("P", (8, 8)).save(root / "b" / "pal.png")
    Image.new("1", (8, 8), 1).save(root / "b" / "bw.png")
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    index = open_source(DataConfig(dataset=f"folder:{root}"))
    assert index.class_names == ["a", "b"] and len(index.labels) == 5
    imgs = index.load(None, 16)
    assert imgs.images.shape == (4, 16, 16, 3)
    assert imgs.skipped == ["b/broken.jpg"]
    gray = imgs.images[list(imgs.source_ids).index("a/gray.png")]
    assert np.all(gray == 128)
    bw = imgs.images[list(imgs.source_ids).index("b/bw.png")]
    assert np.all(bw == 255)


def test_folder_load_reads_only_requested_classes(tmp_path):
    root = write_folder(tmp_path / "f", n_classes=3, per_class=2)
    for p in (root / "class_02").iterdir():
        p.write_bytes(b"garbage")
    index = open_source(DataConfig(dataset=f"folder:{root}"))
    imgs = index.load(np.array([0, 1]), 16)
    assert len(imgs.labels) == 4 and not imgs.skipped


def test_ratio_split_seeded_disjoint_and_seen_count(folder_data):
    index = open_source(DataConfig(dataset=f"folder:{folder_data}"))
    a = class_roles(index, SplitConfig("ratio:0.5", seed=1))
    b = class_roles(index, SplitConfig("ratio:0.5", seed=1))
    c = class_roles(index, SplitConfig("ratio:0.5", seed=2))
    assert list(a) == list(b) and (a == "seen").sum() == 3 and (a == "unseen").sum() == 3
    assert set(np.flatnonzero(a == "seen")).isdisjoint(np.flatnonzero(a == "unseen"))
    assert any(np.flatnonzero(a == "seen") != np.flatnonzero(c == "seen"))
    assert (class_roles(index, SplitConfig("ratio:0.8", seen=1)) == "seen").sum() == 1
    assert (class_roles(index, SplitConfig("ratio:0")) == "unseen").all()
    assert (class_roles(index, SplitConfig("ratio:1")) == "seen").all()


def test_published_cifar_fs_and_fc100(cifar_root):
    index = open_source(DataConfig(dataset="cifar100", data_root=cifar_root))
    roles = class_roles(index, SplitConfig("cifar-fs"))
    assert [(roles == r).sum() for r in ("seen", "val", "unseen")] == [64, 16, 20]
    assert sorted(np.array(index.class_names)[roles == "unseen"]) == sorted(CIFAR_FS_TEST)
    assert sorted(np.array(index.class_names)[roles == "val"]) == sorted(CIFAR_FS_VAL)
    roles = class_roles(index, SplitConfig("fc100"))
    assert [(roles == r).sum() for r in ("seen", "val", "unseen")] == [60, 20, 20]
    assert roles[index.class_names.index("baby")] == "unseen" and roles[index.class_names.index("lion")] == "val"


def test_file_split_and_errors(folder_data, tmp_path):
    index = open_source(DataConfig(dataset=f"folder:{folder_data}"))
    spec = tmp_path / "split.json"
    spec.write_text(json.dumps({"seen": ["class_00", "class_01"], "unseen": ["class_05"]}))
    roles = class_roles(index, SplitConfig(f"file:{spec}"))
    assert list(roles) == ["seen", "seen", "unused", "unused", "unused", "unseen"]
    spec.write_text(json.dumps({"seen": ["nope"]}))
    with pytest.raises(OneShotBenchError, match="'nope' is not in the data set"):
        class_roles(index, SplitConfig(f"file:{spec}"))
    for bad in ("ratio:1.5", "ratio:x", "thirds", "fc100"):
        with pytest.raises(OneShotBenchError):
            class_roles(index, SplitConfig(bad))


def test_image_split_seeded_per_image_and_fraction(folder_data):
    index = open_source(DataConfig(dataset=f"folder:{folder_data}"))
    roles = class_roles(index, SplitConfig("ratio:0.5"))
    cfg = SplitConfig("ratio:0.5", val_fraction=0.25)
    s1 = image_split(index.labels, index.source_ids, roles, cfg)
    s2 = image_split(index.labels, index.source_ids, roles, cfg)
    assert list(s1) == list(s2)
    for c in np.flatnonzero(roles == "seen"):
        rows = index.labels == c
        assert (s1[rows] == "val").sum() == 2 and (s1[rows] == "train").sum() == 6
    assert (s1[np.isin(index.labels, np.flatnonzero(roles == "unseen"))] == "").all()
    # the split of one class does not depend on which other classes are present
    keep = index.labels == np.flatnonzero(roles == "seen")[0]
    s3 = image_split(index.labels[keep], index.source_ids[keep], roles, cfg)
    assert list(s3) == list(s1[keep])


def test_cifar10_reader_official_layout(tmp_path):
    import pickle

    from conftest import class_images

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs, labels = class_images(rng, 10, 1, 32)
        with open(base / name, "wb") as fh:
            pickle.dump({"data": imgs.transpose(0, 3, 1, 2).reshape(10, 3072), "labels": labels.tolist(),
                         "filenames": [f"{name}_{i}.png" for i in range(10)], "batch_label": name}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10}, fh)
    index = open_source(DataConfig(dataset="cifar10", data_root=tmp_path))
    assert index.class_names == names and len(index.labels) == 60 and np.all(index.counts() == 6)
    assert index.source_ids[0] == "train/0" and index.source_ids[49] == "train/49" and index.source_ids[50] == "test/0"
    assert index.superclass is None
