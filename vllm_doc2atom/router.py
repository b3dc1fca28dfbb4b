"""The query router: which atoms of a bank does this question need, and how much of each?

Stage 1 embeds the question and takes the cosine top-K over the bank's provenance keys.
Stage 2 reads each candidate with a cross-encoder reranker (the one a bank was calibrated with, recorded in
its spec; or the server's hook with --doc2atom-stage2) and adds a metadata bias (type priors, answer-bearing
flag, confidence). A logistic head maps the evidence to a weight in [0, 1]; atoms below the
threshold are dropped, at most one atom per conflict group survives, and an empty result
means "refuse": no atom covers the question.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bank_interface import AtomRecord, RerankerIdentity, RoutableBank
from .encoders import QueryEncoder
from .errors import BankError, BankErrorKind
from .key_index import KeyIndex, KeyIndexConfig
from .router_head import DEFAULT_THRESHOLD, RouterHead

logger = logging.getLogger(__name__)

# (question, atom texts) -> one relevance score per text (logit scale).
Reranker = Callable[[str, Sequence[str]], np.ndarray]


@dataclass
class RouterConfig:
    """The server's routing settings. A bank's own RouterHead (trained, calibrated) decides the rest."""

    top_k: int = 8  # stage-1 candidates per question
    threshold_override: float | None = None  # replaces the head's threshold (None: the head's, else 0.5)
    stage2: bool = False  # rerank + metadata bias
    max_atoms_cap: int | None = None  # keep at most this many after thresholding (and at most the head's)
    default_head: RouterHead = field(default_factory=RouterHead)  # for banks without a head of their own
    index: KeyIndexConfig = field(default_factory=KeyIndexConfig)
    index_cache_size: int = 16  # banks whose stage-1 index is kept built


@dataclass
class RoutedAtom:
    index: int  # row in the bank
    atom: AtomRecord
    similarity: float  # stage-1 cosine
    rerank_score: float | None
    weight: float  # router weight in [0, 1]

    def provenance(self, bank: str | None = None) -> dict[str, Any]:
        """What a client needs to show the source of an answer; `bank` names the atom's bank (for a
        BankUnion: union.bank_name_of(self.index)), else the field is left out."""
        a = self.atom
        where = {} if bank is None else {"atom_bank": bank}
        reranked = {} if self.rerank_score is None else {"rerank_score": round(self.rerank_score, 4)}
        return {**where, "id": a.id, "document_id": a.document_id, "type": a.type, "span": list(a.span),
                "weight": round(self.weight, 4), "similarity": round(self.similarity, 4), **reranked}


@dataclass
class RoutingResult:
    query: str
    kept: list[RoutedAtom]  # sorted by weight, highest first
    candidates: list[RoutedAtom]  # every stage-1 candidate, kept or not

    @property
    def refused(self) -> bool:
        return not self.kept

    @property
    def selection(self) -> list[tuple[int, float]]:
        """(bank row, weight) pairs: the composer's input."""
        return [(r.index, r.weight) for r in self.kept]


class Router:
    def __init__(self, encoder: QueryEncoder, config: RouterConfig | None = None,
                 reranker: Reranker | None = None) -> None:
        self.encoder = encoder
        self.config = config or RouterConfig()
        self.reranker = reranker
        self._indexes: OrderedDict[str, KeyIndex] = OrderedDict()  # bank fingerprint -> index (LRU)

    def route(self, bank: RoutableBank, query: str) -> RoutingResult:
        return self.route_batch(bank, [query])[0]

    def route_batch(self, bank: RoutableBank, queries: Sequence[str]) -> list[RoutingResult]:
        self._check_key_space(bank)
        index = self.index_for(bank)
        vectors = self.encoder.encode(list(queries))
        sims, rows = index.search(vectors, self.config.top_k)
        return [self._decide(bank, q, s, r) for q, s, r in zip(queries, sims, rows)]

    def index_for(self, bank: RoutableBank) -> KeyIndex:
        index = self._indexes.get(bank.fingerprint)
        if index is None:
            index = self._stored_index(bank) or self._build_index(bank)
            self._indexes[bank.fingerprint] = index
            while len(self._indexes) > self.config.index_cache_size:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(bank.fingerprint)
        return index

    def _stored_index(self, bank: RoutableBank) -> KeyIndex | None:
        """A v2 AtomBank's stored index, when it is the one this config would build (a BankUnion has none: its
        rows are its members', so no member's index serves it)."""
        stored = getattr(bank, "stored_key_index", None)
        index = stored(self.config.index) if stored is not None else None
        if index is not None:
            logger.info("bank %s: loaded its stored index (%d keys)", bank.name, index.size)
        return index

    def _build_index(self, bank: RoutableBank) -> KeyIndex:
        # A bank that can read its keys in blocks (AtomBank, BankUnion) never holds them all in memory.
        source = bank.key_source() if hasattr(bank, "key_source") else bank.keys
        return KeyIndex(source, self.config.index)

    def _check_key_space(self, bank: RoutableBank) -> None:
        spec = bank.spec
        if spec.key_encoder != self.encoder.identity or spec.key_dim != self.encoder.dim:
            raise BankError(
                f"bank {bank.name!r} is keyed by {spec.key_encoder!r} ({spec.key_dim}-d) but the router encodes "
                f"questions with {self.encoder.identity!r} ({self.encoder.dim}-d)", kind=BankErrorKind.MISMATCH)

    def _decide(self, bank: RoutableBank, query: str, sims: np.ndarray,
                rows: np.ndarray) -> RoutingResult:
        cfg = self.config
        hits = [(int(r), float(s)) for r, s in zip(rows, sims) if r >= 0]
        reranker, text_kind = self._reranker_of(bank)
        head = _head_of(bank) if bank.spec.router_head else cfg.default_head
        candidates = weigh_candidates(query, hits, bank.atoms, head, reranker, text_kind,
                                      stage2=reranker is not None or cfg.stage2)
        threshold = next(t for t in (cfg.threshold_override, head.threshold, DEFAULT_THRESHOLD) if t is not None)
        return RoutingResult(query=query, kept=keep_atoms(candidates, head, threshold, cfg.max_atoms_cap),
                             candidates=candidates)

    def _reranker_of(self, bank: RoutableBank) -> tuple[Reranker | None, str]:
        """The bank's own reranker (the one it was calibrated with) and the text kind it reads; else the
        server's stage-2 hook when stage 2 is on; else none."""
        if bank.spec.reranker is not None:
            from .reranker import reranker_for

            found = reranker_for(RerankerIdentity.from_dict(bank.spec.reranker), bank.reranker_folders(),
                                 bank.name)
            return found, found.text_kind
        if self.config.stage2 and self.reranker is not None:
            return self.reranker, "text"
        return None, "text"


def weigh_candidates(query: str, hits: Sequence[tuple[int, float]], atoms: Sequence[AtomRecord],
                     head: RouterHead, reranker: Reranker | None = None, text_kind: str = "text",
                     stage2: bool = False) -> list[RoutedAtom]:
    """Stage-1 hits (row, cosine), best first -> candidates weighed by the head (with the reranker's scores when
    there is one: read in two steps when the head has `rerank_first`), highest weight first."""
    rerank: list[float | None] = [None] * len(hits)
    if reranker is not None and hits:
        def read(part: Sequence[tuple[int, float]]) -> list[float | None]:
            return [float(x) for x in reranker(query, [rerank_text(atoms[r], text_kind) for r, _ in part])]

        first, sure = head.rerank_first or len(hits), head.rerank_sure
        rerank = read(hits[:first])
        if len(hits) > first and (sure is None or max(rerank) < sure):
            rerank += read(hits[first:])
        hits = hits[: len(rerank)]  # a candidate the reranker did not read is no candidate
    candidates = [RoutedAtom(r, atoms[r], s, rr, head.weight(s, atoms[r], rr, stage2))
                  for (r, s), rr in zip(hits, rerank)]
    candidates.sort(key=lambda c: c.weight, reverse=True)
    return candidates


def rerank_text(atom: AtomRecord, kind: str) -> str:
    """What a reranker reads of an atom: its text, or its routing text ("<about>: <text>", `retrieval_text`)."""
    return atom.retrieval_text or atom.text if kind == "titled" else atom.text


def keep_atoms(candidates: Sequence[RoutedAtom], head: RouterHead, threshold: float,
               max_atoms_cap: int | None = None) -> list[RoutedAtom]:
    """The candidates (sorted by weight, highest first) a head keeps: weight ≥ threshold, one per conflict
    group, near the best in cosine (`max_gap`), of the best atom's document (`same_document`), at most
    `max_atoms` (and `max_atoms_cap`). A head with a `rerank_gap` lets the reranker choose: candidates in rerank
    order, the best kept and others within `rerank_gap` of its score. Empty: refuse. The compiler fits atoms
    with exactly these picks for their study questions."""
    reranked = head.rerank_gap is not None and bool(candidates) and candidates[0].rerank_score is not None
    if reranked:
        candidates = sorted(candidates, key=lambda c: -(c.rerank_score or 0.0))
    kept: list[RoutedAtom] = []
    groups_taken: set[str] = set()
    for c in candidates:
        if c.weight < threshold:
            if reranked:
                continue  # a lower-ranked atom may still pass
            break
        group = c.atom.conflict_group
        if group is not None:
            if group in groups_taken:
                continue  # a contradicting atom with a higher weight is already in
            groups_taken.add(group)
        kept.append(c)
    if head.max_gap is not None and kept:
        best = max(c.similarity for c in kept)
        kept = [c for c in kept if c.similarity >= best - head.max_gap]
    if reranked and kept:
        best = kept[0].rerank_score or 0.0
        kept = [c for c in kept if (c.rerank_score or 0.0) >= best - (head.rerank_gap or 0.0)]
    if head.same_document and kept:
        kept = [c for c in kept if c.atom.document_id == kept[0].atom.document_id]
    limits = [n for n in (max_atoms_cap, head.max_atoms) if n is not None]
    return kept[: min(limits)] if limits else kept


def _head_of(bank: RoutableBank) -> RouterHead:
    return RouterHead.from_dict(bank.spec.router_head)  # BankSpec validated it when the bank loaded


class RouterPool:
    """One Router per key space: each bank is routed with the encoder its keys were made with (its own
    trained query projection, or the plain sentence encoder)."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._routers: dict[str, Router] = {}  # key-encoder identity -> router

    def route(self, bank: RoutableBank, query: str) -> RoutingResult:
        from .encoders import encoder_for

        identity = bank.spec.key_encoder
        if identity not in self._routers:
            self._routers[identity] = Router(encoder_for(bank), self.config)
        return self._routers[identity].route(bank, query)
