"""FAISS retrieval: exact inner-product search, and candidate supports per query.

With many supports (large K, or the seed protocol's one support per unseen class) the pair
head need not score every (query, support) pair: a flat inner-product index over the
L2-normalised support features picks each query's top-m candidates, and only those are
scored by the head.
"""

from __future__ import annotations

import numpy as np


def knn_inner_product(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with a flat FAISS index.

    queries: (q, d) float32; base: (b, d) float32. Returns (scores (q, k) float32,
    indices (q, k) int64), best first.
    """
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    scores, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(base)))
    return scores, idx


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; (n, d) float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def candidate_mask(support_feats: np.ndarray, query_feats: np.ndarray, m: int) -> np.ndarray:
    """Which supports each query keeps as candidates.

    support_feats: (E, s, d) float32; query_feats: (E, q, d) float32 (raw trunk features).
    Returns (E, q, s) bool with exactly min(m, s) True per query: its top-m supports by
    cosine similarity, found by one flat FAISS index per episode.
    """
    n_ep, s, _ = support_feats.shape
    q = query_feats.shape[1]
    mask = np.zeros((n_ep, q, s), dtype=bool)
    if m >= s:
        mask[:] = True
        return mask
    for e in range(n_ep):
        _, idx = knn_inner_product(l2_normalize(query_feats[e]), l2_normalize(support_feats[e]), m)
        np.put_along_axis(mask[e], idx, True, axis=1)
    return mask
