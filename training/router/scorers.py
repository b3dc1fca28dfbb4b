"""Question -> a relevance score for each atom of a bank: MiniLM cosine, BM25, and a reranker re-ordering
another scorer's top candidates. Every scorer ranks any subset of its rows (one document, or all of them)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from vllm_doc2atom.encoders import QueryEncoder

Rows = Sequence[int] | None  # the rows to score; None: every row
# How banks compiled with a reranker are routed (study_routing.RERANKED_HEAD): it reads the stage-1 best 4 of
# the 8 candidates first, and the other 4 only when none of those scores 2 logits. On the validation splits as
# good as reading all 8 (gold first and kept), with 4 read for most questions (docs/results.md, "Reading 4
# candidates first").
RERANK_FIRST, RERANK_SURE = 4, 2.0


class Scorer(Protocol):
    def scores(self, question: str, rows: Rows = None) -> np.ndarray:
        """[len(rows)] relevance scores, higher = more relevant."""
        ...


class RerankerModel(Protocol):
    """What `training.router.reranker.load_reranker(folder)` returns."""

    def score(self, question: str, texts: list[str]) -> np.ndarray: ...


class MiniLMScorer:
    """Cosine between the question's and each atom text's sentence embedding (as a bank's keys are made)."""

    def __init__(self, encoder: QueryEncoder, keys: np.ndarray) -> None:
        self.encoder, self.keys = encoder, keys  # keys: [N, dim], normalised
        self._last: tuple[str, np.ndarray] | None = None  # the last question's embedding: encoded once

    @classmethod
    def of_texts(cls, encoder: QueryEncoder, texts: list[str]) -> MiniLMScorer:
        return cls(encoder, encoder.encode(texts))

    def scores(self, question: str, rows: Rows = None) -> np.ndarray:
        if self._last is None or self._last[0] != question:
            self._last = (question, self.encoder.encode([question])[0])
        keys = self.keys if rows is None else self.keys[np.asarray(rows, dtype=np.int64)]
        return keys @ self._last[1]


def words(text: str) -> list[str]:
    """BM25's tokens: lower-cased word characters."""
    return re.findall(r"\w+", text.lower())


class BM25Scorer:
    """Okapi BM25 (`rank_bm25`) with every text as a document: term statistics over all rows, also when only
    some rows are ranked."""

    def __init__(self, texts: list[str]) -> None:
        from rank_bm25 import BM25Okapi

        self.index = BM25Okapi([words(text) for text in texts])

    def scores(self, question: str, rows: Rows = None) -> np.ndarray:
        tokens = words(question)
        if rows is None:
            return np.asarray(self.index.get_scores(tokens), dtype=np.float64)
        return np.asarray(self.index.get_batch_scores(tokens, list(rows)), dtype=np.float64)


class RerankedScorer:
    """The base scorer's top `top_k` rows re-ordered by a reranker reading (question, text); the rest keep the
    base order below them. With `first`, as the server does: the reranker reads the best `first` of them, and
    the others only when none of those scores `sure` or more (unread rows keep the base order too)."""

    def __init__(self, base: Scorer, reranker: RerankerModel, texts: list[str], top_k: int = 8,
                 first: int | None = None, sure: float | None = None) -> None:
        self.base, self.reranker, self.texts, self.top_k = base, reranker, texts, top_k
        self.first, self.sure = first, sure
        self.last: dict[int, float] = {}  # the last call's reranked positions (in `rows`) -> reranker logit

    def scores(self, question: str, rows: Rows = None) -> np.ndarray:
        base = self.base.scores(question, rows)
        rows = range(len(self.texts)) if rows is None else rows
        top = np.argsort(-base, kind="stable")[: self.top_k]
        first = self.first or len(top)
        reranked = self._read(question, [rows[i] for i in top[:first]])
        if len(top) > first and (self.sure is None or reranked.max() < self.sure):
            reranked = np.concatenate([reranked, self._read(question, [rows[i] for i in top[first:]])])
        top = top[: len(reranked)]
        self.last = {int(i): float(x) for i, x in zip(top, reranked)}
        out = base.astype(np.float64)
        order = top[np.argsort(-reranked, kind="stable")]
        out[order] = out.max() + 1.0 + np.arange(len(order), 0, -1)  # above every other row, in reranked order
        return out

    def _read(self, question: str, rows: list[int]) -> np.ndarray:
        return np.asarray(self.reranker.score(question, [self.texts[r] for r in rows]), dtype=np.float64)
