import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import SPACE, cluster_cache
from oneshot_bench.cache import load_cache
from oneshot_bench.cli import app
from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.head import HeadConfig, fit_head, load_head, sample_pair_batches, train_head

runner = CliRunner()


def _rows(cache):
    seen = np.flatnonzero(cache.class_roles == "seen")
    in_seen = np.isin(cache.labels, seen)
    return np.flatnonzero(in_seen & (cache.image_split == "train")), np.flatnonzero(in_seen & (cache.image_split == "val"))


def test_separable_pairs_reach_099(tmp_path):
    cache = load_cache(cluster_cache(tmp_path / "c.h5", n_classes=12, per_class=40, seen=8))
    tr, va = _rows(cache)
    res = fit_head(cache.features, cache.labels, tr, va, HeadConfig(epochs=20, pairs_per_class=60, lr=3e-3, groups_per_batch=4, quiet=True))
    assert res.final_val["accuracy"] >= 0.99 and res.final_val["auc"] >= 0.99


def test_shuffled_labels_stay_near_chance(tmp_path):
    cache = load_cache(cluster_cache(tmp_path / "c.h5", n_classes=12, per_class=40, seen=8, shuffle_labels=True))
    tr, va = _rows(cache)
    res = fit_head(cache.features, cache.labels, tr, va, HeadConfig(epochs=8, pairs_per_class=60, lr=3e-3, groups_per_batch=4, quiet=True))
    assert abs(res.final_val["accuracy"] - 0.5) < 0.1 and abs(res.final_val["auc"] - 0.5) < 0.12


def test_pair_sampler_balance_coverage_no_duplicates_and_rows():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    rows = np.flatnonzero(labels < 8)  # classes 8, 9 play unseen: never sampled
    batches = sample_pair_batches(labels, rows, 50, rng, group_size=5, groups_per_batch=8)
    a = np.concatenate([b.images[b.i] for b in batches])
    b_ = np.concatenate([b.images[b.j] for b in batches])
    y = np.concatenate([b.y for b in batches])
    assert np.isin(np.concatenate([b.images for b in batches]), rows).all()
    assert (y == 1).sum() == (y == 0).sum() == 8 * 50
    assert np.all((labels[a] == labels[b_]) == (y == 1))
    keys = np.minimum(a, b_) * 1000 + np.maximum(a, b_)
    assert len(np.unique(keys)) == len(keys) and np.all(a != b_)
    for c in range(8):
        assert ((labels[a] == c) & (y == 1)).sum() == 50
        assert ((labels[a] == c) & (y == 0)).sum() == 50  # each class anchors its negatives
    for batch in batches:
        assert (batch.y == 1).sum() == (batch.y == 0).sum()


@pytest.mark.parametrize("per_class,pairs,group_size,groups_per_batch,hard", [
    (12, 30, 5, 6, False),  # 2 groups of 5 give 20 pairs: a second permutation, repeats dropped
    (7, 30, 5, 4, False),  # 21 possible pairs: every pair of the class, one group of all
    (30, 40, 5, 1, False),  # one group per batch: a single class, partners from all rows
    (30, 40, 5, 6, True),  # half the negatives from the hard neighbours
])
def test_pair_sampler_rules_hold_in_edge_cases(per_class, pairs, group_size, groups_per_batch, hard):
    labels = np.repeat(np.arange(6), per_class)
    rows = np.flatnonzero(labels < 5)
    rng = np.random.default_rng(1)
    neighbors = None
    if hard:  # each image's "nearest" other-class images: the next class's first ten
        neighbors = np.stack([np.flatnonzero(labels == (labels[r] + 1) % 5)[:10] for r in range(len(labels))])
    batches = sample_pair_batches(labels, rows, pairs, rng, group_size, groups_per_batch, neighbors)
    a = np.concatenate([b.images[b.i] for b in batches])
    b_ = np.concatenate([b.images[b.j] for b in batches])
    y = np.concatenate([b.y for b in batches])
    n_pos = min(pairs, per_class * (per_class - 1) // 2)
    assert (y == 1).sum() == (y == 0).sum() == 5 * n_pos
    assert np.isin(np.concatenate([a, b_]), rows).all()
    assert np.all((labels[a] == labels[b_]) == (y == 1))
    keys = np.minimum(a, b_) * 1000 + np.maximum(a, b_)
    assert len(np.unique(keys)) == len(keys)
    for batch in batches:
        assert (batch.y == 1).sum() == (batch.y == 0).sum()
    if hard:  # about half the negatives (the hard ones) pair with the first ten of the next class
        neg_a, neg_b = a[y == 0], b_[y == 0]
        from_nb = np.array([nb in neighbors[an] for an, nb in zip(neg_a, neg_b)])
        assert from_nb.mean() > 0.45


def test_unseen_features_never_touch_training(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", n_classes=10, per_class=20, seen=6)
    import h5py

    with h5py.File(path, "r+") as f:  # poison every unseen feature: a single read would show as NaN
        roles = f["class_roles"].asstr()[()]
        unseen = np.isin(f["labels"][()], np.flatnonzero(roles == "unseen"))
        feats = f["features"][()]
        feats[unseen] = np.nan
        f["features"][...] = feats
    out = train_head(HeadConfig(cache=path, out=tmp_path / "h.pt", epochs=3, pairs_per_class=20, quiet=True))
    head, meta = load_head(out)
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in meta["history"])
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_same_seed_same_head_bit_for_bit(tmp_path):
    path = cluster_cache(tmp_path / "c.h5")
    cfg = dict(cache=path, epochs=3, pairs_per_class=20, quiet=True, negatives="hard")
    _, t1 = __import__("oneshot_bench.provenance", fromlist=["x"]).load_checkpoint(train_head(HeadConfig(out=tmp_path / "a.pt", **cfg)))
    _, t2 = __import__("oneshot_bench.provenance", fromlist=["x"]).load_checkpoint(train_head(HeadConfig(out=tmp_path / "b.pt", **cfg)))
    assert all(torch.equal(t1["head"][k], t2["head"][k]) for k in t1["head"])


def test_mix_head_and_info(tmp_path):
    path = cluster_cache(tmp_path / "c.h5")
    out = train_head(HeadConfig(cache=path, out=tmp_path / "m.pt", head="siamese-mix", epochs=2, pairs_per_class=20, quiet=True))
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and '"siamese-mix"' in r.output and '"final_val"' in r.output


def test_head_refused_on_other_feature_space_and_accepted_on_same(tmp_path):
    head = train_head(HeadConfig(cache=cluster_cache(tmp_path / "a.h5"), out=tmp_path / "h.pt", epochs=2, pairs_per_class=20, quiet=True))
    other_trunk = cluster_cache(tmp_path / "b.h5", space=dict(SPACE, trunk_sha256="b" * 64))
    other_size = cluster_cache(tmp_path / "s.h5", space=dict(SPACE, image_size=64))
    flipped = cluster_cache(tmp_path / "f.h5", space=dict(SPACE, tta="flip"))
    same_space_other_data = cluster_cache(tmp_path / "d.h5", seed=5, n_classes=9)
    for bad, needle in ((other_trunk, "trunk_sha256"), (other_size, "image_size: head 32 vs cache 64"),
                        (flipped, "tta: head none vs cache flip")):
        r = runner.invoke(app, ["episodes", "--cache", str(bad), "--head", str(head), "--n-episodes", "10", "-q"])
        assert r.exit_code == 2 and "another feature space" in r.output and needle in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["episodes", "--cache", str(same_space_other_data), "--head", str(head), "--n-episodes", "10", "-q", "--n-way", "3"])
    assert r.exit_code == 0, r.output


def test_head_errors(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", seen=1)
    with pytest.raises(OneShotBenchError, match="at least 2"):
        train_head(HeadConfig(cache=path, out=tmp_path / "h.pt", quiet=True))
    r = runner.invoke(app, ["train-head", "--cache", str(path), "--head", "siamese-xx", "--out", str(tmp_path / "h.pt"), "-q"])
    assert r.exit_code == 2
