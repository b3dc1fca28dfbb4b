"""Stage-1 retrieval: cosine top-K over provenance keys with faiss.

Small banks get an exact flat index. Above `exact_max` keys an inverted-file index answers by scanning only
`nprobe` of its ~sqrt(N) lists; it stores each key as 8-bit scalar-quantised codes (a quarter of float32: a
million 384-d keys take 0.4 GB, not 1.5 GB) and re-scores its `rescore`·k best candidates exactly with their
float32 keys, read back from the bank, so the similarities it returns are exact cosines. The index is built
from the keys in blocks: a bank's keys never need to sit in memory whole. An IVF index can be serialised and
rebuilt from those bytes (a bank stores one: bank_index.py), so that a server need not build it again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

BLOCK_ROWS = 1 << 16  # keys normalised and added per step while building
STORED_FORMAT = "doc2atom-key-index"  # names a serialised IVF index's metadata


@dataclass
class KeyIndexConfig:
    exact_max: int = 50_000  # banks up to this many atoms are searched exactly
    nprobe: int = 16  # IVF lists visited per query (recall vs. speed)
    train_points_per_list: int = 64  # k-means training sample size per list
    storage: str = "sq8"  # IVF codes: "sq8" (1 byte per dimension), "fp16" or "flat" (float32)
    rescore: int = 4  # IVF: re-score rescore·k candidates with exact keys (0: return the codes' scores)
    seed: int = 0


class KeySource(Protocol):
    """Keys in row order without holding them all: an AtomBank of format v2 reads them from its segments."""

    dim: int

    def __len__(self) -> int: ...

    def chunks(self, rows: int) -> Iterator[np.ndarray]: ...  # float32 blocks of about `rows` rows, in order

    def take(self, rows: np.ndarray) -> np.ndarray: ...  # float32 [len(rows), dim]


class ArrayKeys:
    """A KeySource over an array in memory."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = np.asarray(keys)
        if self.keys.ndim != 2:
            raise ValueError(f"keys must be [N, dim], got shape {self.keys.shape}")
        self.dim = self.keys.shape[1]

    def __len__(self) -> int:
        return len(self.keys)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.keys), rows):
            yield self.keys[start: start + rows]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.keys[rows], np.float32)


class ChainedKeys:
    """Several KeySources one after another (a BankUnion's members)."""

    def __init__(self, sources: Sequence[KeySource]) -> None:
        self.sources = list(sources)
        self.dim = self.sources[0].dim
        self._starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for source in self.sources:
            yield from source.chunks(rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        member = np.searchsorted(self._starts, rows, side="right") - 1
        for m in np.unique(member):
            picked = np.flatnonzero(member == m)
            out[picked] = self.sources[int(m)].take(rows[picked] - self._starts[m])
        return out


def nlist_for(size: int) -> int:
    """IVF lists for `size` keys: ~sqrt(N) balances list scans against centroid comparisons."""
    return max(1, int(math.sqrt(size)))


def stored_meta(config: KeyIndexConfig, rows: int, dim: int) -> dict[str, str]:
    """What a serialised IVF index records of how it was built (safetensors metadata: strings only)."""
    # what shapes the index; nprobe and rescore are search settings, applied to whichever index is loaded
    fields = {"rows": rows, "dim": dim, "storage": config.storage, "nlist": nlist_for(rows), "seed": config.seed,
              "train_points_per_list": config.train_points_per_list}
    return {"format": STORED_FORMAT, **{k: str(v) for k, v in fields.items()}}


def stored_matches(meta: Mapping[str, str], config: KeyIndexConfig, rows: int, dim: int) -> bool:
    """Would `config` build this very index over `rows` keys? (It must also choose IVF at that size.)"""
    return rows > config.exact_max and dict(meta) == stored_meta(config, rows, dim)


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (cosine similarity becomes inner product); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class KeyIndex:
    """Cosine-similarity search over a fixed set of keys."""

    def __init__(self, keys: np.ndarray | KeySource, config: KeyIndexConfig | None = None) -> None:
        import faiss

        self.config = config or KeyIndexConfig()
        source = ArrayKeys(keys) if isinstance(keys, np.ndarray) else keys
        self.size, self.dim = len(source), source.dim
        self.exact = self.size <= self.config.exact_max
        self._source: KeySource | None = None  # kept for re-scoring
        if self.exact:
            self._index = faiss.IndexFlatIP(self.dim)
        else:
            self._index = self._ivf(faiss, source)
            self._source = source if self.config.rescore > 0 else None
        for block in source.chunks(BLOCK_ROWS):
            self._index.add(normalize(block))
        if self._index.ntotal != self.size:
            raise ValueError(f"key source yielded {self._index.ntotal} keys, expected {self.size}")

    @classmethod
    def deserialize(cls, data: np.ndarray, meta: Mapping[str, str], source: KeySource,
                    config: KeyIndexConfig) -> KeyIndex:
        """An IVF index from `serialize`'s bytes, re-scoring with `source`. Raises ValueError unless `meta` is
        what `config` would have built over `source` (`stored_matches` says so without the bytes)."""
        import faiss

        if not stored_matches(meta, config, len(source), source.dim):
            raise ValueError(f"stored index {dict(meta)} was not built with {config} over {len(source)} keys")
        index = cls.__new__(cls)
        index.config, index.size, index.dim, index.exact = config, len(source), source.dim, False
        index._index = faiss.deserialize_index(np.ascontiguousarray(data, np.uint8))
        if index._index.ntotal != index.size or index._index.d != index.dim:
            raise ValueError(f"stored index holds {index._index.ntotal} {index._index.d}-d keys, expected "
                             f"{index.size} {index.dim}-d")
        index._index.nprobe = min(config.nprobe, nlist_for(index.size))
        index._source = source if config.rescore > 0 else None
        return index

    def serialize(self) -> tuple[np.ndarray, dict[str, str]]:
        """(the faiss index as uint8 bytes, metadata naming what built it). Only an IVF index: an exact one is
        its keys, rebuilt as fast as it would be read."""
        import faiss

        if self.exact:
            raise ValueError("an exact index is not stored")
        return faiss.serialize_index(self._index), stored_meta(self.config, self.size, self.dim)

    def _ivf(self, faiss, source: KeySource):  # noqa: ANN001, ANN202 (faiss has no type hints)
        nlist = nlist_for(self.size)
        quantizer = faiss.IndexFlatIP(self.dim)
        storage = self.config.storage
        if storage == "flat":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            kind = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}[storage]
            index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, kind,
                                                  faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(self.config.seed)
        sample_size = min(self.size, nlist * self.config.train_points_per_list)
        sample = np.sort(rng.choice(self.size, size=sample_size, replace=False))  # file order: fewer seeks
        index.train(normalize(source.take(sample)))
        index.nprobe = min(self.config.nprobe, nlist)
        logger.info("built IVF-%s index over %d keys (%d lists, nprobe %d)", storage, self.size, nlist,
                    index.nprobe)
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine similarities [q, k], key indices [q, k]); missing hits have index -1."""
        queries = normalize(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} != key dimension {self.dim}")
        k = max(1, min(k, self.size)) if self.size else 1
        if not self.size:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self._source is None:
            return self._index.search(queries, k)
        _, candidates = self._index.search(queries, min(self.size, k * self.config.rescore))
        sims = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        for q, found in enumerate(candidates):
            found = found[found >= 0]
            exact = normalize(self._source.take(found)) @ queries[q]
            best = np.argsort(-exact, kind="stable")[:k]
            sims[q, : len(best)], rows[q, : len(best)] = exact[best], found[best]
        return sims, rows
