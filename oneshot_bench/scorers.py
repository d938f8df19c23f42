"""Scorers: how a query is compared with the supports of an episode.

Every scorer maps index tensors support (E, K, S) and query (E, Q) (rows of its prepared
feature matrix) to class scores (E, Q, K) float32; the prediction is the argmax over K.
Features are prepared once per run (normalised, centred or embedded by the head), so an
episode batch costs only gathers and batched matrix products.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from oneshot_bench.errors import OneShotBenchError

SCORERS = ("pair-head", "cosine", "l2", "cl2n")


class Scorer:
    name = ""

    def score(self, support: torch.Tensor, query: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class CosineScorer(Scorer):
    """Cosine similarity to the prototype (mean of the L2-normalised supports)."""

    name = "cosine"

    def __init__(self, features: torch.Tensor) -> None:
        self.x = F.normalize(features, dim=1)

    def score(self, support, query, candidates=None):
        proto = F.normalize(self.x[support].mean(2), dim=-1)  # (E, K, d)
        return torch.bmm(self.x[query], proto.transpose(1, 2))


class L2Scorer(Scorer):
    """Negative squared euclidean distance to the prototype (ProtoNet's rule)."""

    name = "l2"

    def __init__(self, features: torch.Tensor) -> None:
        self.x = features
        self.sq = (features * features).sum(1)

    def score(self, support, query, candidates=None):
        proto = self.x[support].mean(2)  # (E, K, d)
        cross = torch.bmm(self.x[query], proto.transpose(1, 2))
        return 2 * cross - self.sq[query].unsqueeze(2) - (proto * proto).sum(2).unsqueeze(1)


class CL2NScorer(L2Scorer):
    """SimpleShot's CL2N: subtract the seen-train mean, L2-normalise, nearest prototype."""

    name = "cl2n"

    def __init__(self, features: torch.Tensor, mean: torch.Tensor) -> None:
        super().__init__(F.normalize(features - mean, dim=1))


def _positions(n: int, rows: torch.Tensor) -> torch.Tensor:
    """(n,) int64 map from a feature row to its position among `rows` (-1 where absent), so
    that a scorer can keep per-pool arrays and still take the episodes' cache rows."""
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[rows] = torch.arange(len(rows))
    return pos


class PairHeadScorer(Scorer):
    """The head's same-class probability; with S > 1 shots, the mean over the class's
    supports. With a candidate mask (E, Q, K*S), only candidate supports are scored (the
    others count as 0) and a class without candidates scores -1, below any probability.

    siamese-l1's logit w.|e1 - e2| + b is a difference of two L1 distances between rescaled
    embeddings (the dimensions where w > 0 and those where w < 0), so it runs as two
    torch.cdist(p=1) calls and never materialises the (E, Q, K*S, hidden) differences."""

    name = "pair-head"

    def __init__(self, head, features: torch.Tensor, rows: np.ndarray | None = None, max_elements: int = 1 << 22) -> None:
        """rows: the only feature rows episodes will use (the pool); None = all."""
        rows = torch.arange(len(features)) if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64))
        self.pos = _positions(len(features), rows)
        with torch.inference_mode():  # in chunks: the normalised copy of all features is not needed at once
            self.emb = torch.cat([head.embed(features[rows[i : i + 4096]]) for i in range(0, len(rows), 4096)])
            self.l1 = None
            if head.kind == "siamese-l1":
                w, self.bias = head.combine.weight[0], float(head.combine.bias[0])
                self.l1 = (self.emb[:, w > 0] * w[w > 0], self.emb[:, w < 0] * -w[w < 0])
        self.head = head
        self.max_elements = max_elements

    def _logits(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """(E, q) query rows and (E, KS) support rows -> (E, q, KS) logits."""
        if self.l1 is not None:
            pos, neg = self.l1
            out = torch.cdist(pos[query], pos[support], p=1)
            if neg.shape[1]:
                out -= torch.cdist(neg[query], neg[support], p=1)
            return out + self.bias
        return self.head.pair_logits(self.emb[query].unsqueeze(2), self.emb[support].unsqueeze(1))

    def score(self, support, query, candidates=None):
        n_ep, k, s = support.shape
        sup, query = self.pos[support.reshape(n_ep, k * s)], self.pos[query]
        out = torch.empty((n_ep, query.shape[1], k), dtype=torch.float32)
        width = self.emb.shape[1] if self.l1 is None else 1  # cdist keeps no per-dimension temporaries
        step = max(1, self.max_elements // max(1, n_ep * k * s * width))
        for q0 in range(0, query.shape[1], step):
            prob = torch.sigmoid(self._logits(query[:, q0 : q0 + step], sup)).view(n_ep, -1, k, s)  # (E, q, K, S)
            if candidates is None:
                out[:, q0 : q0 + step] = prob.mean(3)
            else:
                # supports left out by retrieval count as probability 0: a class is not
                # favoured for having few candidates, and m = all gives the plain mean
                mask = candidates[:, q0 : q0 + step].view(n_ep, -1, k, s).float()
                mean = (prob * mask).sum(3) / s
                out[:, q0 : q0 + step] = torch.where(mask.sum(3) > 0, mean, torch.full_like(mean, -1.0))
        return out


class PoolGram:
    """Dot products between all images of the episode pool, computed once: D = X X^T, (m, m).

    Every episode of the cosine, l2 and cl2n scorers then only gathers entries of D:
    Q x K*S (and K*S x K*S for N > 1) per episode instead of Q + K*S feature rows.
    cl2n's centred dot products follow from D: (x-u).(y-u) = x.y - x.u - y.u + u.u.
    """

    def __init__(self, features: torch.Tensor, pool_rows: np.ndarray, mean: torch.Tensor | None) -> None:
        pool = features[torch.from_numpy(pool_rows)]
        self.d = pool @ pool.T
        self.sq = torch.diagonal(self.d).clone()
        self.inv_norm = 1.0 / self.sq.clamp(min=1e-12).sqrt()
        self.pos = _positions(len(features), torch.from_numpy(pool_rows))
        if mean is not None:
            self.a = pool @ mean
            self.c = mean @ mean
            self.nc = (self.sq - 2 * self.a + self.c).clamp(min=1e-12).sqrt()

    def pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """D between pool positions a (E, p) and b (E, r): (E, p, r). One gather from the
        flattened D: several times faster than two-index advanced indexing."""
        idx = a.unsqueeze(2) * self.d.shape[0] + b.unsqueeze(1)
        return self.d.view(-1).index_select(0, idx.view(-1)).view(idx.shape)

    def blocks(self, support: torch.Tensor, query: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(E, Q, K*S) query-support and, for S > 1, (E, K*S, K*S) support-support products.
        kind: "raw" (x.y), "cos" (x.y / |x||y|) or "cl2n" (centred, normalised)."""
        n_ep, k, s = support.shape
        qp, sp = self.pos[query], self.pos[support.reshape(n_ep, k * s)]
        qs = self.pairs(qp, sp)
        ss = self.pairs(sp, sp) if s > 1 else None
        if kind == "raw":
            return qs, ss
        if kind == "cos":
            inv = self.inv_norm
            qs = qs * inv[qp].unsqueeze(2) * inv[sp].unsqueeze(1)
            return qs, None if ss is None else ss * inv[sp].unsqueeze(2) * inv[sp].unsqueeze(1)
        aq, as_ = self.a[qp].unsqueeze(2), self.a[sp].unsqueeze(1)
        nq, ns = self.nc[qp].unsqueeze(2), self.nc[sp].unsqueeze(1)
        qs = (qs - aq - as_ + self.c) / (nq * ns)
        if ss is not None:
            ss = (ss - self.a[sp].unsqueeze(2) - as_ + self.c) / (self.nc[sp].unsqueeze(2) * ns)
        return qs, ss


def _proto_sq(ss: torch.Tensor | None, k: int, s: int) -> torch.Tensor:
    """|prototype|^2 per class from support-support products: mean over the class's block."""
    if ss is None:
        return None
    n_ep = ss.shape[0]
    blocks = torch.diagonal(ss.view(n_ep, k, s, k, s), dim1=1, dim2=3)  # (E, S, S, K)
    return blocks.mean((1, 2))


class GramScorer(Scorer):
    """cosine, l2 or cl2n read off a PoolGram; same scores as the gathering scorers."""

    def __init__(self, name: str, gram: PoolGram) -> None:
        self.name, self.gram = name, gram

    def score(self, support, query, candidates=None):
        n_ep, k, s = support.shape
        kind = {"cosine": "cos", "l2": "raw", "cl2n": "cl2n"}[self.name]
        qs, ss = self.gram.blocks(support, query, kind)
        mean_qs = qs.view(n_ep, -1, k, s).mean(3)  # q . prototype
        psq = _proto_sq(ss, k, s)
        if self.name == "cosine":
            return mean_qs if psq is None else mean_qs / psq.clamp(min=1e-12).sqrt().unsqueeze(1)
        if psq is None:  # one shot: |prototype|^2 is the support's own square
            sp = self.gram.pos[support.reshape(n_ep, k)]
            psq = self.gram.sq[sp] if self.name == "l2" else torch.ones(n_ep, k)
        qsq = self.gram.sq[self.gram.pos[query]].unsqueeze(2) if self.name == "l2" else 1.0
        return 2 * mean_qs - qsq - psq.unsqueeze(1)


GRAM_MAX_POOL = 12_000  # above this, D would cost more memory than gathering saves time


def build_scorers(names: list[str], features: np.ndarray, seen_mean: np.ndarray | None, head,
                  pool_rows: np.ndarray | None = None) -> list[Scorer]:
    """Prepare the named scorers over (n, d) float32 features.

    pool_rows: the rows episodes draw from; when given and not too many, cosine/l2/cl2n use
    one Gram matrix of the pool instead of gathering feature rows per episode."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    mean = None if seen_mean is None else torch.from_numpy(seen_mean.astype(np.float32))
    gram = None
    if pool_rows is not None and len(pool_rows) <= GRAM_MAX_POOL and set(names) & {"cosine", "l2", "cl2n"}:
        gram = PoolGram(x, np.asarray(pool_rows, dtype=np.int64), mean)
    out: list[Scorer] = []
    for name in names:
        if name == "cl2n" and mean is None:
            raise OneShotBenchError("scorer cl2n needs seen-class train images in the cache to centre on")
        if name in ("cosine", "l2", "cl2n") and gram is not None:
            out.append(GramScorer(name, gram))
        elif name == "cosine":
            out.append(CosineScorer(x))
        elif name == "l2":
            out.append(L2Scorer(x))
        elif name == "cl2n":
            out.append(CL2NScorer(x, mean))
        elif name == "pair-head":
            if head is None:
                raise OneShotBenchError("scorer pair-head needs --head PATH (a checkpoint from train-head)")
            out.append(PairHeadScorer(head, x, pool_rows))
        else:
            raise OneShotBenchError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return out
