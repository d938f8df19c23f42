"""The pair head and its training on cached features (`train-head`).

The head says whether two images show the same class (1) or not (0). Its embedding MLP is
per image, so a batch embeds each image once and forms all its pairs from those
embeddings; scoring a query against K supports costs O(K x hidden) after that.

Also here: the balanced pair sampler, shared with `finetune --objective pairs`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.progress import Progress
from oneshot_bench.provenance import (
    HEAD_KIND,
    canonical_json,
    check_writable,
    load_checkpoint,
    package_versions,
    save_checkpoint,
    to_jsonable,
)
from oneshot_bench.stats import roc_auc
from oneshot_bench.trunk import FEATURE_SPACE_OFF

log = logging.getLogger(__name__)

HEAD_KINDS = ("siamese-l1", "siamese-mix")
# Bumped whenever the same seed would draw other pairs: `run` keys heads and pair-trained
# trunks on it. 2: whole-epoch array sampling (1 looped over groups and batches).
PAIR_SAMPLER_VERSION = 2


class PairHead(nn.Module):
    """Same-class classifier on (d,) features.

    siamese-l1 (the seed project's): e = MLP(x) = dropout(relu(W x)) with d -> hidden,
    logit = w . |e1 - e2| + b.  siamese-mix: [|e1 - e2|, e1 * e2] -> hidden/2 -> 1.
    Inputs are L2-normalised and scaled by sqrt(d) first, so the head does not depend on
    the trunk's feature scale.
    """

    def __init__(self, dim: int = 512, kind: str = "siamese-l1", hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise OneShotBenchError(f"unknown head {kind!r}; use {' or '.join(HEAD_KINDS)}")
        self.dim, self.kind, self.hidden, self.dropout_p = dim, kind, hidden, dropout
        self.embedding = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        if kind == "siamese-l1":
            self.combine = nn.Linear(hidden, 1)
        else:
            self.combine = nn.Sequential(nn.Linear(2 * hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    def config(self) -> dict:
        return {"dim": self.dim, "kind": self.kind, "hidden": self.hidden, "dropout": self.dropout_p}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) float32 features -> the embedding MLP's (..., d) inputs."""
        return F.normalize(x, dim=-1) * math.sqrt(self.dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) float32 features -> (..., hidden) embeddings."""
        return self.embedding(self.normalize(x))

    def pair_logits(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., hidden) twice (broadcastable) -> (...) logits."""
        diff = (e1 - e2).abs()
        if self.kind == "siamese-l1":
            return self.combine(diff).squeeze(-1)
        e1, e2 = torch.broadcast_tensors(e1, e2)
        return self.combine(torch.cat([diff.expand_as(e1), e1 * e2], dim=-1)).squeeze(-1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Features (n, d) twice -> (n,) logits, embedding each side separately."""
        return self.pair_logits(self.embed(x1), self.embed(x2))


def pair_logits_of_batch(head: PairHead, emb: torch.Tensor, i: np.ndarray, j: np.ndarray) -> torch.Tensor:
    """Logits (m,) of pairs (i, j) among a batch's embeddings (b, hidden).

    index_select, not advanced indexing: its backward (index_add) sums each row's gradient
    in a fixed order, where advanced indexing's accumulate-put does not, and training would
    differ from run to run in the last bits."""
    return head.pair_logits(emb.index_select(0, torch.from_numpy(i)), emb.index_select(0, torch.from_numpy(j)))


# --- pairs ------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """images: (b,) rows of the feature/image array embedded once for this batch;
    i, j: (m,) positions into `images`; y: (m,) float32, 1 = same class."""

    images: np.ndarray
    i: np.ndarray
    j: np.ndarray
    y: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.y)


def sample_pair_batches(
    labels: np.ndarray,
    rows: np.ndarray,
    pairs_per_class: int,
    rng: np.random.Generator,
    group_size: int = 5,
    groups_per_batch: int = 32,
    neighbors: np.ndarray | None = None,
) -> list[PairBatch]:
    """One epoch of balanced same/different pairs among `rows`.

    labels: (n,) int class of every row of the array; rows: (r,) rows allowed (e.g. seen
    train images: nothing else is ever sampled). Each class contributes up to
    `pairs_per_class` positive pairs (from random groups of `group_size` of its images) and as
    many negative pairs anchored on its images, so positives equal negatives and every class
    appears in both. No unordered pair appears twice in an epoch. A batch holds
    `groups_per_batch` groups; its negatives pair images of the batch, so each image is
    embedded once per batch. neighbors: optional (n, k) rows of nearest other-class images;
    when given, half of the negatives take the partner from the anchor's neighbours.
    Whole-epoch array work: a Python loop runs per class and per batch, never per pair.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_total = len(labels)
    if len(np.unique(labels[rows])) < 2:
        raise OneShotBenchError("pair training needs at least two classes with images")
    g_members, g_len, pos_a, pos_b, pos_group = _positive_groups(labels, rows, pairs_per_class, group_size, rng, n_total)
    n_groups = len(g_len)
    if n_groups == 0:  # no class has two images
        return []
    g_off = np.concatenate([[0], np.cumsum(g_len)])
    member_group = np.repeat(np.arange(n_groups), g_len)
    batch_of_group = np.empty(n_groups, dtype=np.int64)
    batch_of_group[rng.permutation(n_groups)] = np.arange(n_groups) // groups_per_batch
    n_batches = int(batch_of_group.max()) + 1

    # each group anchors as many negatives as it has positives, cycling over a shuffle of its images
    shuffled = g_members[np.lexsort((rng.random(len(g_members)), member_group))]
    first_pair = np.searchsorted(pos_group, np.arange(n_groups))
    t = np.arange(len(pos_group)) - first_pair[pos_group]
    anchors = shuffled[g_off[pos_group] + t % g_len[pos_group]]  # negative k goes with positive k
    pair_batch = batch_of_group[pos_group]

    # partners come from the batch's own images (unique per batch), or from all rows when a
    # batch holds a single class
    bm_keys = _sorted_unique(batch_of_group[member_group] * n_total + g_members)
    bm_batch, bm_rows = bm_keys // n_total, bm_keys % n_total
    b_off = np.searchsorted(bm_batch, np.arange(n_batches + 1))
    bm_labels = labels[bm_rows]
    one_class = np.minimum.reduceat(bm_labels, b_off[:-1]) == np.maximum.reduceat(bm_labels, b_off[:-1])
    # negatives pair two classes, so they can only repeat each other, never a positive
    partners = _draw_negatives(anchors, pair_batch, bm_rows, b_off, one_class, rows, labels, rng, n_total, neighbors)

    order = np.argsort(pair_batch, kind="stable")
    p_off = np.searchsorted(pair_batch[order], np.arange(n_batches + 1))
    batches = []
    for b in range(n_batches):
        sel = order[p_off[b]:p_off[b + 1]]  # the batch's positives, and as many negatives
        pa, pb, na, nb = pos_a[sel], pos_b[sel], anchors[sel], partners[sel]
        ok = nb >= 0
        if not ok.all():  # rare: duplicates could not be avoided; keep the batch balanced
            keep = np.sort(rng.permutation(len(pa))[: int(ok.sum())])
            pa, pb, na, nb = pa[keep], pb[keep], na[ok], nb[ok]
        images = _sorted_unique(np.concatenate([bm_rows[b_off[b]:b_off[b + 1]], nb]))
        a, bb = np.concatenate([pa, na]), np.concatenate([pb, nb])
        y = np.concatenate([np.ones(len(pa), np.float32), np.zeros(len(na), np.float32)])
        batches.append(PairBatch(images, np.searchsorted(images, a), np.searchsorted(images, bb), y))
    return batches


def _positive_groups(labels, rows, pairs_per_class, group_size, rng, n_total):
    """Per class, groups of its images and the positive pairs inside them.

    Returns flat group members (sum of group sizes,), group sizes (G,), and pairs a, b and
    their group (P,), groups numbered in class order. Groups of one permutation are disjoint,
    so their pairs are distinct; only classes needing a second permutation check repeats."""
    members_all, lens, pa, pb, pg = [], [], [], [], []
    n_groups = 0
    order = np.argsort(labels[rows], kind="stable")
    sorted_rows = rows[order]
    _, starts, counts = np.unique(labels[sorted_rows], return_index=True, return_counts=True)
    for start, n_c in zip(starts.tolist(), counts.tolist()):
        if n_c < 2:
            continue
        members = sorted_rows[start:start + n_c]
        max_pos = n_c * (n_c - 1) // 2
        n_pos = min(pairs_per_class, max_pos)
        g = n_c if (n_c <= group_size or 2 * n_pos > max_pos) else group_size
        tri_a, tri_b = np.triu_indices(g, 1)
        taken = np.empty(0, dtype=np.int64)
        while len(taken) < n_pos:
            grp = rng.permutation(members)[: (n_c // g) * g].reshape(-1, g)
            a, b = grp[:, tri_a], grp[:, tri_b]
            keys = np.minimum(a, b) * n_total + np.maximum(a, b)
            fresh = ~np.isin(keys, taken) if len(taken) else np.ones(keys.shape, dtype=bool)
            pick = np.flatnonzero(fresh.ravel())[: n_pos - len(taken)]
            gid = pick // len(tri_a)
            kept, local = np.unique(gid, return_inverse=True)
            members_all.append(grp[kept].ravel())
            lens.append(np.full(len(kept), g))
            pa.append(a.ravel()[pick])
            pb.append(b.ravel()[pick])
            pg.append(n_groups + local)
            n_groups += len(kept)
            taken = np.concatenate([taken, keys.ravel()[pick]])
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
    return cat(members_all), cat(lens), cat(pa), cat(pb), cat(pg)


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique(x) by one sort: numpy 2's hash-based unique was several times slower on
    these int64 key arrays, and it ran once per batch."""
    s = np.sort(x)
    return s[np.concatenate([[True], s[1:] != s[:-1]])] if len(s) else s


def _in_sorted(x: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """np.isin(x, sorted_values) by binary search: the values are already sorted."""
    if not len(sorted_values):
        return np.zeros(x.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_values, x), len(sorted_values) - 1)
    return sorted_values[pos] == x


def _draw_negatives(anchors, batch, bm_rows, b_off, one_class, rows, labels, rng, n_total, neighbors, tries: int = 8):
    """Partners (n,) for negative anchors (n,), -1 where none could be found: another class,
    from the anchor's batch (or its hard neighbours), no pair repeated in the epoch."""
    n = len(anchors)
    partners = np.full(n, -1, dtype=np.int64)
    hard = np.zeros(n, dtype=bool)
    if neighbors is not None:
        hard[rng.permutation(n)[: n // 2]] = True
    size = b_off[batch + 1] - b_off[batch]
    used = np.empty(0, dtype=np.int64)  # sorted keys of the negatives accepted so far
    pending = np.arange(n)
    for attempt in range(tries):
        if len(pending) == 0:
            break
        wide = one_class[batch[pending]]
        cand = np.where(wide, rows[rng.integers(0, len(rows), len(pending))],
                        bm_rows[b_off[batch[pending]] + rng.integers(0, size[pending])])
        h = hard[pending]
        if h.any():
            nb = neighbors[anchors[pending[h]]]
            cand[h] = nb[np.arange(len(nb)), rng.integers(0, nb.shape[1], len(nb))]
        a = anchors[pending]
        keys = np.minimum(a, cand) * n_total + np.maximum(a, cand)
        good = (labels[cand] != labels[a]) & ~_in_sorted(keys, used)
        order = np.argsort(keys, kind="stable")  # a key drawn twice in this round: keep the first
        repeat = np.zeros(len(keys), dtype=bool)
        repeat[order[1:]] = keys[order[1:]] == keys[order[:-1]]
        good &= ~repeat
        partners[pending[good]] = cand[good]
        used = np.sort(np.concatenate([used, keys[good]]))
        pending = pending[~good]
        if attempt == tries // 2:
            hard[pending] = False  # fall back to random partners for stubborn anchors
    return partners


# --- training ---------------------------------------------------------------------------


def train_epoch(head: PairHead, opt: torch.optim.Optimizer, xn: torch.Tensor, batches: list[PairBatch]) -> tuple[float, int, int]:
    """One pass over `batches`; xn: (n, d) float32 features already through `head.normalize`
    (once per fit, not once per batch). Each batch embeds its images once and forms its
    pairs from the embeddings. Returns (summed loss, correct, pairs)."""
    head.train()
    total, correct, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64), 0
    for b in batches:
        emb = head.embedding(xn.index_select(0, torch.from_numpy(b.images)))
        logit = pair_logits_of_batch(head, emb, b.i, b.j)
        y = torch.from_numpy(b.y)
        loss = F.binary_cross_entropy_with_logits(logit, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # summed as tensors: no conversion to Python per batch
            total += loss.detach() * len(y)
            correct += ((logit.detach() > 0) == (y > 0.5)).sum()
        count += len(y)
    return float(total), int(correct), count


@dataclass(frozen=True)
class HeadConfig:
    """train-head options. pairs_per_class counts positives (as many negatives follow)."""

    cache: Path = Path("cache/features.h5")
    out: Path = Path("cache/head.pt")
    head: str = "siamese-l1"
    hidden: int = 128
    dropout: float = 0.3
    pairs_per_class: int = 250
    negatives: str = "random"
    hard_k: int = 10
    epochs: int = 30
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    group_size: int = 5
    groups_per_batch: int = 32
    seed: int = 0
    quiet: bool = False


@dataclass
class EpochMetrics:
    loss: float
    accuracy: float
    auc: float
    scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    targets: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def _evaluate_pairs(head: PairHead, features: torch.Tensor, batches: list[PairBatch]) -> EpochMetrics:
    head.eval()
    logits, ys = [], []
    with torch.inference_mode():
        for b in batches:
            emb = head.embed(features.index_select(0, torch.from_numpy(b.images)))
            logits.append(pair_logits_of_batch(head, emb, b.i, b.j))
            ys.append(torch.from_numpy(b.y))
    logit, y = torch.cat(logits), torch.cat(ys)
    loss = F.binary_cross_entropy_with_logits(logit, y).item()
    prob = torch.sigmoid(logit).numpy()
    return EpochMetrics(loss, float(((prob > 0.5) == (y.numpy() > 0.5)).mean()), roc_auc(prob, y.numpy()), prob, y.numpy())


def hard_neighbors(features: np.ndarray, labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(n, k) int64: for each row in `rows`, its k nearest other-class rows (cosine, FAISS)."""
    from oneshot_bench.retrieval import knn_inner_product

    x = features[rows].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    _, idx = knn_inner_product(x, x, min(len(rows), 4 * k + 1))
    out = np.zeros((len(labels), k), dtype=np.int64)
    for local, r in enumerate(rows.tolist()):
        cand = rows[idx[local]]
        cand = cand[(labels[cand] != labels[r])][:k]
        if len(cand) == 0:
            cand = rows[labels[rows] != labels[r]][:k]
        out[r] = np.resize(cand, k)
    return out


def train_head(cfg: HeadConfig) -> Path:
    """Train the pair head on the seen classes' train images of a cache; write a checkpoint."""
    from oneshot_bench.cache import load_cache

    if cfg.negatives not in ("random", "hard"):
        raise OneShotBenchError(f"--negatives {cfg.negatives!r} must be random or hard")
    if cfg.pairs_per_class < 1 or cfg.epochs < 1:
        raise OneShotBenchError("--pairs-per-class and --epochs must be positive")
    check_writable(Path(cfg.out))
    cache = load_cache(cfg.cache)
    seen = np.flatnonzero(cache.class_roles == "seen")
    if len(seen) < 2:
        raise OneShotBenchError(f"cache {cfg.cache} has {len(seen)} seen classes; the head needs at least 2")
    train_rows = np.flatnonzero(np.isin(cache.labels, seen) & (cache.image_split == "train"))
    val_rows = np.flatnonzero(np.isin(cache.labels, seen) & (cache.image_split == "val"))
    result = fit_head(cache.features, cache.labels, train_rows, val_rows, cfg)
    meta = {
        "kind": HEAD_KIND,
        "head": result.head.config(),
        "config": to_jsonable(cfg),
        "pair_sampler_version": PAIR_SAMPLER_VERSION,
        "seed": cfg.seed,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "final_val": result.final_val,
        "val_score_histogram": result.histogram,
        "cache": str(cfg.cache),
        "cache_fingerprint": cache.fingerprint,
        "cache_data_fingerprint": cache.attrs["data_fingerprint"],
        "feature_space": cache.feature_space,
        "feature_space_sha256": cache.attrs["feature_space_sha256"],
        "n_train_images": int(len(train_rows)),
        "n_val_images": int(len(val_rows)),
        "versions": package_versions(),
        "wall_s": result.wall_s,
    }
    save_checkpoint(Path(cfg.out), HEAD_KIND, meta, {"head": result.head.state_dict()})
    return Path(cfg.out)


@dataclass
class FitResult:
    head: PairHead
    history: list[dict]
    best_epoch: int
    final_val: dict
    histogram: dict
    wall_s: float


def fit_head(features: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray, cfg: HeadConfig) -> FitResult:
    """Train on pairs among `train_rows` only; early-stop on pairs among `val_rows`.

    features: (n, d) float32; labels: (n,) int64. Rows outside train_rows/val_rows are never
    read: only the two subsets are copied into the trainer.
    """
    t0 = time.perf_counter()
    train_x = torch.from_numpy(np.ascontiguousarray(features[train_rows], dtype=np.float32))
    train_y = labels[train_rows]
    local_train = np.arange(len(train_rows))
    neighbors = hard_neighbors(train_x.numpy(), train_y, local_train, cfg.hard_k) if cfg.negatives == "hard" else None
    val_x = torch.from_numpy(np.ascontiguousarray(features[val_rows], dtype=np.float32))
    val_y = labels[val_rows]
    val_batches = []
    if len(val_rows) and len(np.unique(val_y)) >= 2:
        val_batches = sample_pair_batches(
            val_y, np.arange(len(val_rows)), cfg.pairs_per_class, _epoch_rng(cfg.seed, 0, 1), cfg.group_size, cfg.groups_per_batch
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = PairHead(features.shape[1], cfg.head, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    train_xn = head.normalize(train_x)
    history: list[dict] = []
    best_loss, best_epoch, best_state, stale = math.inf, -1, None, 0
    with Progress("train-head", total=cfg.epochs, quiet=cfg.quiet, unit="epoch") as bar:
        for epoch in range(cfg.epochs):
            te = time.perf_counter()
            batches = sample_pair_batches(
                train_y, local_train, cfg.pairs_per_class, _epoch_rng(cfg.seed, epoch, 0), cfg.group_size, cfg.groups_per_batch, neighbors
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout masks, reproducible per epoch
                total, correct, count = train_epoch(head, opt, train_xn, batches)
            row = {"epoch": epoch, "train_loss": total / count, "train_accuracy": correct / count, "train_pairs": count}
            if val_batches:
                m = _evaluate_pairs(head, val_x, val_batches)
                row.update(val_loss=m.loss, val_accuracy=m.accuracy, val_auc=m.auc)
            row["wall_s"] = time.perf_counter() - te
            history.append(row)
            monitor = row.get("val_loss", row["train_loss"])
            if monitor < best_loss - 1e-6:
                best_loss, best_epoch, stale = monitor, epoch, 0
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
            else:
                stale += 1
            status = f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} auc {row['val_auc']:.3f}" if val_batches else f"loss {row['train_loss']:.4f}"
            bar.advance(1, status=status)
            log.info("head epoch %d: %s", epoch, status)
            if stale >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    final_val, histogram = {}, {}
    if val_batches:
        m = _evaluate_pairs(head, val_x, val_batches)
        final_val = {"loss": m.loss, "accuracy": m.accuracy, "auc": m.auc, "n_pairs": len(m.targets)}
        edges = np.linspace(0, 1, 41)
        histogram = {
            "edges": edges.tolist(),
            "same": np.histogram(m.scores[m.targets > 0.5], edges)[0].tolist(),
            "different": np.histogram(m.scores[m.targets < 0.5], edges)[0].tolist(),
        }
    return FitResult(head, history, best_epoch, final_val, histogram, time.perf_counter() - t0)


def load_head(path: Path) -> tuple[PairHead, dict]:
    """Read a head checkpoint; returns the head in eval mode and its metadata."""
    meta, tensors = load_checkpoint(Path(path), HEAD_KIND)
    cfg = meta["head"]
    head = PairHead(cfg["dim"], cfg["kind"], cfg["hidden"], cfg["dropout"])
    head.load_state_dict(tensors["head"])
    head.eval()
    return head, meta


def check_feature_space(head_meta: dict, head_path: Path, cache_attrs: dict, cache_path: Path) -> None:
    """Refuse a head on a cache of another feature space (trunk, image size, norm, dtype, tta)."""
    if head_meta["feature_space_sha256"] == cache_attrs["feature_space_sha256"]:
        return
    hs, cs = head_meta["feature_space"], cache_attrs["feature_space"]
    hs, cs = {**FEATURE_SPACE_OFF, **hs}, {**FEATURE_SPACE_OFF, **cs}
    diffs = [k for k in sorted(set(hs) | set(cs)) if hs.get(k) != cs.get(k)]
    desc = "; ".join(f"{k}: head {_short(hs.get(k))} vs cache {_short(cs.get(k))}" for k in diffs)
    raise OneShotBenchError(f"head {head_path} belongs to another feature space than cache {cache_path} ({desc})")


def _short(v) -> str:
    s = canonical_json(v) if isinstance(v, (dict, list)) else str(v)
    return s[:12] if len(s) == 64 else s[:60]


