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


class PairHeadScorer(Scorer):
    """The head's same-class probability; with S > 1 shots, the mean over the class's
    supports. With a candidate mask (E, Q, K*S), only candidate supports are scored and a
    class without candidates scores -1, below any probability."""

    name = "pair-head"

    def __init__(self, head, features: torch.Tensor, max_elements: int = 1 << 24) -> None:
        with torch.inference_mode():
            self.emb = head.embed(features)
        self.head = head
        self.max_elements = max_elements

    def score(self, support, query, candidates=None):
        n_ep, k, s = support.shape
        sup = self.emb[support.reshape(n_ep, k * s)]  # (E, KS, h)
        out = torch.empty((n_ep, query.shape[1], k), dtype=torch.float32)
        step = max(1, self.max_elements // max(1, n_ep * k * s * sup.shape[-1]))
        for q0 in range(0, query.shape[1], step):
            qe = self.emb[query[:, q0 : q0 + step]]  # (E, q, h)
            prob = torch.sigmoid(self.head.pair_logits(qe.unsqueeze(2), sup.unsqueeze(1)))  # (E, q, KS)
            prob = prob.view(n_ep, -1, k, s)
            if candidates is None:
                out[:, q0 : q0 + step] = prob.mean(3)
            else:
                mask = candidates[:, q0 : q0 + step].view(n_ep, -1, k, s).float()
                n = mask.sum(3)
                mean = (prob * mask).sum(3) / n.clamp(min=1)
                out[:, q0 : q0 + step] = torch.where(n > 0, mean, torch.full_like(mean, -1.0))
        return out


def build_scorers(names: list[str], features: np.ndarray, seen_mean: np.ndarray | None, head) -> list[Scorer]:
    """Prepare the named scorers over (n, d) float32 features (the episode pool)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    out: list[Scorer] = []
    for name in names:
        if name == "cosine":
            out.append(CosineScorer(x))
        elif name == "l2":
            out.append(L2Scorer(x))
        elif name == "cl2n":
            if seen_mean is None:
                raise OneShotBenchError("scorer cl2n needs seen-class train images in the cache to centre on")
            out.append(CL2NScorer(x, torch.from_numpy(seen_mean.astype(np.float32))))
        elif name == "pair-head":
            if head is None:
                raise OneShotBenchError("scorer pair-head needs --head PATH (a checkpoint from train-head)")
            out.append(PairHeadScorer(head, x))
        else:
            raise OneShotBenchError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return out
