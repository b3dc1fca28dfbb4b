"""Stage-1 retrieval: cosine top-K over provenance keys with faiss.

Small banks get an exact flat index; above `exact_max` keys an inverted-file index (IVF-Flat)
answers in well under a millisecond per query by scanning only `nprobe` of its ~sqrt(N) lists.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class KeyIndexConfig:
    exact_max: int = 50_000  # banks up to this many atoms are searched exactly
    nprobe: int = 16  # IVF lists visited per query (recall vs. speed)
    train_points_per_list: int = 64  # k-means training sample size per list
    seed: int = 0


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (cosine similarity becomes inner product); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class KeyIndex:
    """Cosine-similarity search over a fixed set of keys."""

    def __init__(self, keys: np.ndarray, config: KeyIndexConfig | None = None) -> None:
        import faiss

        self.config = config or KeyIndexConfig()
        keys = normalize(keys)
        self.size, self.dim = keys.shape
        self.exact = self.size <= self.config.exact_max
        if self.exact:
            self._index = faiss.IndexFlatIP(self.dim)
        else:
            nlist = max(1, int(math.sqrt(self.size)))
            quantizer = faiss.IndexFlatIP(self.dim)
            self._index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(self.config.seed)
            sample_size = min(self.size, nlist * self.config.train_points_per_list)
            sample = keys[rng.choice(self.size, size=sample_size, replace=False)]
            self._index.train(sample)
            self._index.nprobe = min(self.config.nprobe, nlist)
            logger.info("built IVF index over %d keys (%d lists, nprobe %d)", self.size, nlist, self._index.nprobe)
        if self.size:
            self._index.add(keys)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine similarities [q, k], key indices [q, k]); missing hits have index -1."""
        queries = normalize(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} != key dimension {self.dim}")
        k = max(1, min(k, self.size)) if self.size else 1
        if not self.size:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self._index.search(queries, k)
