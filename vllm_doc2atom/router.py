"""The query router: which atoms of a bank does this question need, and how much of each?

Stage 1 embeds the question and takes the cosine top-K over the bank's provenance keys.
Stage 2 (optional) adds a reranker score and a metadata bias (type priors, answer-bearing
flag, confidence). A logistic head maps the evidence to a weight in [0, 1]; atoms below the
threshold are dropped, at most one atom per conflict group survives, and an empty result
means "refuse": no atom covers the question.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .bank import AtomBank, AtomRecord
from .encoders import QueryEncoder
from .errors import BankError
from .key_index import KeyIndex, KeyIndexConfig

if TYPE_CHECKING:
    from .bank_union import BankUnion

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # for a head without a calibrated threshold

# (question, atom texts) -> one relevance score per text (logit scale).
Reranker = Callable[[str, Sequence[str]], np.ndarray]


@dataclass
class RouterHead:
    """weight = sigmoid(sim_scale·(cos − sim_center) + rerank_scale·rerank + type_bias[type]
                        + answer_bearing_bias·answer_bearing + confidence_scale·(confidence − 1)).

    The defaults suit untrained keys from all-MiniLM-L6-v2 (cos ≥ 0.35 passes a 0.5 threshold);
    a trained checkpoint supplies its own values. The rerank term applies in stage 2 only; the metadata
    terms too, unless `metadata` says they were learned as part of this head (then they always apply).
    """

    sim_scale: float = 20.0
    sim_center: float = 0.35
    rerank_scale: float = 1.0
    type_bias: dict[str, float] = field(default_factory=dict)
    answer_bearing_bias: float = 0.0
    confidence_scale: float = 0.0
    metadata: bool = False  # the metadata terms were trained with the head
    threshold: float | None = None  # refusal threshold calibrated for this head (`doc2atom checkpoint calibrate`)
    max_atoms: int | None = None  # compose at most this many (the atoms were fitted in compositions this size)
    # Drop atoms whose cosine is more than this below the best atom's: far below the top they are other
    # topics (often other documents), and composing them only adds noise to the right atom's update.
    max_gap: float | None = None
    # Keep only atoms of the best atom's document: atoms fitted together per document (self-study) never saw
    # another document's atoms summed with theirs, and such sums garble the right atom's fact.
    same_document: bool = False

    def weight(self, similarity: float, atom: AtomRecord, rerank: float | None, stage2: bool) -> float:
        logit = self.sim_scale * (similarity - self.sim_center)
        if stage2:
            logit += self.rerank_scale * (rerank or 0.0)
        if stage2 or self.metadata:
            logit += self.type_bias.get(atom.type, 0.0)
            logit += self.answer_bearing_bias * float(atom.answer_bearing)
            logit += self.confidence_scale * (atom.confidence - 1.0)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))

    @classmethod
    def from_dict(cls, data: Any) -> RouterHead:
        """A head from a bank manifest, every field checked, so a bad one fails when the bank loads, not
        mid-routing. Missing fields take their defaults; unknown ones are refused (a corrupt manifest, or a
        bank from a newer doc2atom)."""
        if not isinstance(data, dict):
            raise BankError(f"malformed router head: expected an object, got {type(data).__name__}")
        unknown = sorted(str(k)[:40] for k in set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise BankError(f"malformed router head: unknown fields {unknown[:5]}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            problem = _HEAD_FIELDS[name](value)
            if problem:
                raise BankError(f"malformed router head: {name} must be {problem}, got {_short(value)}")
            values[name] = _number(value) if name not in ("metadata", "max_atoms") else value
        return cls(**values)


@dataclass
class RouterConfig:
    top_k: int = 8  # stage-1 candidates per question
    threshold: float | None = None  # atoms whose weight is below are dropped; None: the bank head's, else 0.5
    stage2: bool = False  # rerank + metadata bias
    max_atoms: int | None = None  # keep at most this many after thresholding
    head: RouterHead = field(default_factory=RouterHead)
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
        return {**where, "id": a.id, "document_id": a.document_id, "type": a.type, "span": list(a.span),
                "weight": round(self.weight, 4), "similarity": round(self.similarity, 4)}


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

    def route(self, bank: AtomBank | BankUnion, query: str) -> RoutingResult:
        return self.route_batch(bank, [query])[0]

    def route_batch(self, bank: AtomBank | BankUnion, queries: Sequence[str]) -> list[RoutingResult]:
        self._check_key_space(bank)
        index = self.index_for(bank)
        vectors = self.encoder.encode(list(queries))
        sims, rows = index.search(vectors, self.config.top_k)
        return [self._decide(bank, q, s, r) for q, s, r in zip(queries, sims, rows)]

    def index_for(self, bank: AtomBank | BankUnion) -> KeyIndex:
        index = self._indexes.get(bank.fingerprint)
        if index is None:
            index = KeyIndex(bank.keys, self.config.index)
            self._indexes[bank.fingerprint] = index
            while len(self._indexes) > self.config.index_cache_size:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(bank.fingerprint)
        return index

    def _check_key_space(self, bank: AtomBank | BankUnion) -> None:
        spec = bank.spec
        if spec.key_encoder != self.encoder.identity or spec.key_dim != self.encoder.dim:
            raise BankError(
                f"bank {bank.name!r} is keyed by {spec.key_encoder!r} ({spec.key_dim}-d) but the router encodes "
                f"questions with {self.encoder.identity!r} ({self.encoder.dim}-d)", kind="mismatch")

    def _decide(self, bank: AtomBank | BankUnion, query: str, sims: np.ndarray,
                rows: np.ndarray) -> RoutingResult:
        cfg = self.config
        hits = [(int(r), float(s)) for r, s in zip(rows, sims) if r >= 0]
        rerank: list[float | None] = [None] * len(hits)
        if cfg.stage2 and self.reranker is not None and hits:
            scores = self.reranker(query, [bank.atoms[r].text for r, _ in hits])
            rerank = [float(x) for x in scores]
        head = _head_of(bank) if bank.spec.router_head else cfg.head  # a trained bank's own
        candidates = [
            RoutedAtom(r, bank.atoms[r], s, rr, head.weight(s, bank.atoms[r], rr, cfg.stage2))
            for (r, s), rr in zip(hits, rerank)
        ]
        candidates.sort(key=lambda c: c.weight, reverse=True)
        threshold = next(t for t in (cfg.threshold, head.threshold, DEFAULT_THRESHOLD) if t is not None)
        kept: list[RoutedAtom] = []
        groups_taken: set[str] = set()
        for c in candidates:
            if c.weight < threshold:
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
        if head.same_document and kept:
            kept = [c for c in kept if c.atom.document_id == kept[0].atom.document_id]
        limits = [n for n in (cfg.max_atoms, head.max_atoms) if n is not None]
        if limits:
            kept = kept[: min(limits)]
        return RoutingResult(query=query, kept=kept, candidates=candidates)


def _head_of(bank: AtomBank | BankUnion) -> RouterHead:
    return RouterHead.from_dict(bank.spec.router_head)  # BankSpec validated it when the bank loaded


# ---- router head validation --------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Any:
    """JSON gives 1 for 1.0: floats stay floats, the type_bias dict gets float values; None stays None."""
    if isinstance(value, dict):
        return {k: float(v) for k, v in value.items()}
    return float(value) if _is_number(value) else value


def _float_field(value: Any) -> str | None:
    return None if _is_number(value) else "a finite number"


def _type_bias(value: Any) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())
    return None if ok else "an object of finite numbers by atom type"


def _bool_field(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _threshold(value: Any) -> str | None:
    return None if value is None or (_is_number(value) and 0 <= value <= 1) else "a number in [0, 1] or null"


def _max_gap(value: Any) -> str | None:
    return None if value is None or (_is_number(value) and value >= 0) else "a non-negative number or null"


def _max_atoms(value: Any) -> str | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "a positive integer or null"


# field -> what is wrong with a value (None: nothing)
_HEAD_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "sim_scale": _float_field, "sim_center": _float_field, "rerank_scale": _float_field,
    "type_bias": _type_bias, "answer_bearing_bias": _float_field, "confidence_scale": _float_field,
    "metadata": _bool_field, "threshold": _threshold, "max_atoms": _max_atoms, "max_gap": _max_gap,
    "same_document": _bool_field,
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RouterPool:
    """One Router per key space: each bank is routed with the encoder its keys were made with (its own
    trained query projection, or the plain sentence encoder)."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._routers: dict[str, Router] = {}  # key-encoder identity -> router

    def route(self, bank: AtomBank | BankUnion, query: str) -> RoutingResult:
        from .encoders import encoder_for

        identity = bank.spec.key_encoder
        if identity not in self._routers:
            self._routers[identity] = Router(encoder_for(bank), self.config)
        return self._routers[identity].route(bank, query)
