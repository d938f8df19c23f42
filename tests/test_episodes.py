import json

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import cluster_cache
from oneshot_bench.cache import load_cache
from oneshot_bench.cli import app
from oneshot_bench.episodes import EpisodeConfig, make_pool, run_episodes, sample_episodes, sample_seed_protocol
from oneshot_bench.head import HeadConfig, train_head
from oneshot_bench.retrieval import candidate_mask, knn_inner_product
from oneshot_bench.stats import mean_ci95, paired_differences, roc_auc

runner = CliRunner()


def _acc(report):
    return {r["scorer"]: r for r in report["results"]}


def test_separated_clusters_give_one_for_every_scorer(tmp_path):
    # the head must see enough classes to learn a metric rather than the seen classes themselves
    path = cluster_cache(tmp_path / "c.h5", n_classes=40, per_class=20, seen=30, dim=8)
    head = train_head(HeadConfig(cache=path, out=tmp_path / "h.pt", epochs=20, pairs_per_class=40, lr=3e-3, groups_per_batch=4, quiet=True))
    rep = run_episodes(EpisodeConfig(cache=path, head=head, n_way=5, n_shot=1, n_query=10, n_episodes=300, quiet=True))
    res = _acc(rep)
    assert set(res) == {"pair-head", "cosine", "l2", "cl2n"}
    for r in res.values():
        assert r["accuracy"] == 1.0 and r["ci95"] == 0.0 and r["n_episodes"] == 300


def test_shuffled_labels_give_chance(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", n_classes=20, per_class=30, seen=4, shuffle_labels=True)
    rep = run_episodes(EpisodeConfig(cache=path, n_way=5, n_query=15, n_episodes=2000, quiet=True))
    for r in rep["results"]:
        assert abs(r["accuracy"] - 0.2) < 3 * r["ci95"] + 0.005, r


def test_episodes_are_pure_in_seed_and_index(tmp_path):
    cache = load_cache(cluster_cache(tmp_path / "c.h5", n_classes=12, per_class=20, seen=2))
    pool = make_pool(cache, ("unseen",))
    full = sample_episodes(pool, np.arange(1000), 7, 5, 2, 3)
    part = sample_episodes(pool, np.arange(990, 1000), 7, 5, 2, 3)
    assert np.array_equal(full.support[990:], part.support) and np.array_equal(full.query[990:], part.query)
    other = sample_episodes(pool, np.arange(1000), 8, 5, 2, 3)
    assert not np.array_equal(full.support, other.support)
    ep = full
    for e in range(20):
        rows = np.concatenate([ep.support[e].ravel(), ep.query[e]])
        assert len(np.unique(rows)) == len(rows)  # supports and queries distinct
        for k in range(5):
            assert set(cache.labels[ep.support[e, k]]) == {ep.classes[e, k]}
            assert set(cache.labels[ep.query[e][ep.query_label[e] == k]]) == {ep.classes[e, k]}
        assert len(set(ep.classes[e])) == 5 and (cache.class_roles[ep.classes[e]] == "unseen").all()


def test_episode_sampling_is_uniform():
    """Classes, supports and queries are drawn uniformly: chi-square against equal counts."""
    from oneshot_bench.episodes import pool_from_labels

    labels = np.repeat(np.arange(8), np.array([10, 12, 9, 30, 10, 11, 16, 10]))
    pool = pool_from_labels(labels, np.arange(len(labels)))
    ep = sample_episodes(pool, np.arange(20_000), 3, 4, 1, 3)

    def chi2_ok(counts):  # mean + 5 sd of a chi-square with len(counts) - 1 degrees of freedom
        expected = counts.sum() / len(counts)
        dof = len(counts) - 1
        return ((counts - expected) ** 2 / expected).sum() < dof + 5 * np.sqrt(2 * dof)

    assert chi2_ok(np.bincount(ep.classes.ravel(), minlength=8))
    for c in (0, 3):  # a small and a large class: each image equally often a support, a query
        rows = np.flatnonzero(labels == c)
        assert chi2_ok(np.bincount(ep.support.ravel(), minlength=len(labels))[rows])
        assert chi2_ok(np.bincount(ep.query.ravel(), minlength=len(labels))[rows])
    # the order of the K classes is random too: class 0 equally often in each slot
    assert chi2_ok(np.array([(ep.classes[:, k] == 0).sum() for k in range(4)]))


def test_results_identical_across_batch_size_workers_and_prefix(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", n_classes=14, per_class=25, seen=6, spread=0.35)
    base = dict(cache=path, n_way=5, n_shot=1, n_query=5, quiet=True)
    a = run_episodes(EpisodeConfig(n_episodes=1000, batch_size=1000, workers=1, per_episode_out=tmp_path / "a.json", **base))
    run_episodes(EpisodeConfig(n_episodes=1000, batch_size=37, workers=3, per_episode_out=tmp_path / "b.json", **base))
    run_episodes(EpisodeConfig(n_episodes=300, batch_size=64, per_episode_out=tmp_path / "c.json", **base))
    pa, pb, pc = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "abc")
    assert pa == pb
    assert all(pa[k][:300] == pc[k] for k in pa)
    assert 0.3 < _acc(a)["cosine"]["accuracy"] < 1.0  # a non-trivial problem, so equality means something


def test_ci_formula_and_paired_difference():
    acc = np.array([1.0, 0.5, 0.75, 0.25])
    mean, ci = mean_ci95(acc)
    assert mean == pytest.approx(0.625)
    assert ci == pytest.approx(1.96 * np.sqrt(0.078125) / 2)  # population variance 0.078125, n = 4
    d = paired_differences({"a": acc, "b": acc - 0.25})[0]
    assert d["mean_difference"] == pytest.approx(0.25) and d["ci95"] == pytest.approx(0.0)
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)


def test_faiss_matches_numpy_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 16)).astype(np.float32)
    q = rng.normal(size=(30, 16)).astype(np.float32)
    scores, idx = knn_inner_product(q, base, 7)
    brute = np.argsort(-(q @ base.T), axis=1)[:, :7]
    assert np.array_equal(idx, brute)
    assert np.allclose(scores, np.take_along_axis(q @ base.T, brute, 1), atol=1e-5)
    sup = rng.normal(size=(4, 12, 16)).astype(np.float32)
    qq = rng.normal(size=(4, 9, 16)).astype(np.float32)
    mask = candidate_mask(sup, qq, 3)
    nrm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    sim = np.einsum("eqd,esd->eqs", nrm(qq), nrm(sup))
    expect = np.zeros_like(mask)
    np.put_along_axis(expect, np.argsort(-sim, axis=2)[:, :, :3], True, axis=2)
    assert np.array_equal(mask, expect)


def test_seed_protocol_and_candidate_sweep(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", n_classes=16, per_class=12, seen=6)
    cache = load_cache(path)
    pool = make_pool(cache, ("unseen",))
    ep = sample_seed_protocol(pool, np.arange(3), 0, 1)
    assert ep.support.shape == (3, 10, 1) and ep.query.shape == (3, 10 * 12 - 10)
    for e in range(3):
        assert len(np.unique(np.concatenate([ep.support[e].ravel(), ep.query[e]]))) == 120
    head = train_head(HeadConfig(cache=path, out=tmp_path / "h.pt", epochs=20, pairs_per_class=30, lr=3e-3, groups_per_batch=4, quiet=True))
    rep = run_episodes(EpisodeConfig(cache=path, head=head, protocol="seed", n_episodes=5, candidates=(1, 5, 0), quiet=True))
    res = _acc(rep)
    assert res["pair-head[m=1]"]["recall"] == 1.0 and res["pair-head[m=5]"]["recall"] == 1.0
    assert res["pair-head[m=1]"]["accuracy"] == res["cosine"]["accuracy"] == 1.0
    assert res["pair-head"]["recall"] is None and res["pair-head"]["n_way"] == 10


def test_episode_file_reproduces_and_rejects_unknown_ids(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", n_classes=10, per_class=10, seen=4)
    cache = load_cache(path)
    ids = {c: [s for s, l in zip(cache.source_ids, cache.labels) if l == c] for c in range(10)}
    episodes = [{"support": {"class5": ids[5][:1], "class6": ids[6][:1]}, "query": {"class5": ids[5][1:4], "class6": ids[6][1:3]}}]
    f = tmp_path / "eps.json"
    f.write_text(json.dumps(episodes))
    rep = run_episodes(EpisodeConfig(cache=path, episode_file=f, scorers=("cosine",), quiet=True))
    assert rep["results"][0]["accuracy"] == 1.0 and rep["results"][0]["n_episodes"] == 1
    episodes[0]["query"]["class6"].append("nope.png")
    f.write_text(json.dumps(episodes))
    r = runner.invoke(app, ["episodes", "--cache", str(path), "--episode-file", str(f), "-q"])
    assert r.exit_code == 2 and "unknown image id 'nope.png'" in r.output


def test_episode_errors(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", n_classes=10, per_class=10, seen=4)
    cases = [
        (["--n-way", "7"], "exceeds the 6 classes"),
        (["--n-shot", "5", "--n-query", "6"], "has 10 images; n-shot + n-query needs 11"),
        (["--scorers", "cosine,magic", "--n-query", "3"], "unknown scorer 'magic'"),
        (["--scorers", "pair-head", "--n-query", "3"], "needs --head"),
        (["--protocol", "odd", "--n-query", "3"], "unknown protocol"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, ["episodes", "--cache", str(path), "-q", "--n-episodes", "5", *args])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)


def test_cli_table_reports_episodes_and_ci(tmp_path):
    path = cluster_cache(tmp_path / "c.h5", n_classes=10, per_class=10, seen=4)
    r = runner.invoke(app, ["episodes", "--cache", str(path), "-q", "--n-episodes", "50", "--n-query", "3", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "± 95% CI" in r.output and "50" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["ci_method"].startswith("1.96 * population std") and rep["versions"]["faiss"]


@pytest.mark.parametrize("n_shot", [1, 3])
def test_gram_scorers_equal_the_gathering_scorers(n_shot):
    import torch

    from oneshot_bench.scorers import build_scorers

    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(300, 24))).astype(np.float32)
    pool_rows = np.arange(100, 300)
    support = torch.from_numpy(rng.choice(pool_rows, size=(7, 4, n_shot)))
    query = torch.from_numpy(rng.choice(pool_rows, size=(7, 9)))
    mean = feats[:100].mean(0)
    names = ["cosine", "l2", "cl2n"]
    direct = build_scorers(names, feats, mean, None)
    gram = build_scorers(names, feats, mean, None, pool_rows)
    for a, b in zip(direct, gram):
        assert type(a).__name__ != type(b).__name__
        sa, sb = a.score(support, query), b.score(support, query)
        assert torch.allclose(sa, sb, rtol=1e-4, atol=1e-4), a.name


@pytest.mark.parametrize("kind", ["siamese-l1", "siamese-mix"])
def test_pair_head_scorer_matches_the_head_pair_by_pair(kind):
    """The scorer's shortcuts (pool-only embeddings; siamese-l1 as two L1 distances) give the
    head's own probabilities, averaged over each class's shots."""
    import torch

    from oneshot_bench.head import PairHead
    from oneshot_bench.scorers import PairHeadScorer

    torch.manual_seed(0)
    head = PairHead(16, kind).eval()
    feats = torch.randn(50, 16)
    pool = np.arange(10, 50)
    scorer = PairHeadScorer(head, feats, pool, max_elements=300)  # small chunks: several query slices
    support = torch.from_numpy(np.random.default_rng(0).choice(pool, (3, 4, 2)))  # E=3, K=4, S=2
    query = torch.from_numpy(np.random.default_rng(1).choice(pool, (3, 7)))
    with torch.inference_mode():
        got = scorer.score(support, query)
        for e in range(3):
            for q in range(7):
                for k in range(4):
                    x1 = feats[query[e, q]].expand(2, 16)
                    want = torch.sigmoid(head(x1, feats[support[e, k]])).mean()
                    assert abs(float(got[e, q, k]) - float(want)) < 1e-5
