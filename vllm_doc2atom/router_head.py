"""The router head: how stage-1 similarity (plus, in stage 2, a reranker score and atom metadata) becomes an
atom's weight in [0, 1], and which atoms a weight admits. A bank may carry a trained, calibrated head in its
manifest; `RouterHead.from_dict` checks every field of one so that a bad head fails when the bank loads."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from .errors import BankError

DEFAULT_THRESHOLD = 0.5  # for a head without a calibrated threshold


class AtomMetadata(Protocol):
    """The atom fields the metadata terms read (an AtomRecord has them)."""

    type: str
    answer_bearing: bool
    confidence: float


@dataclass
class RouterHead:
    """weight = sigmoid(sim_scale·(cos − sim_center) + rerank_scale·(rerank − rerank_center) + type_bias[type]
                        + answer_bearing_bias·answer_bearing + confidence_scale·(confidence − 1)).

    The defaults suit untrained keys from all-MiniLM-L6-v2 (cos ≥ 0.35 passes a 0.5 threshold);
    a trained checkpoint supplies its own values. The rerank term applies in stage 2 only; the metadata
    terms too, unless `metadata` says they were learned as part of this head (then they always apply).
    A bank calibrated with a trained reranker has sim_scale 0 and rerank_scale 1: its weight is the
    reranker's probability that the atom holds the answer (`RERANKED_HEAD`).
    """

    sim_scale: float = 20.0
    sim_center: float = 0.35
    rerank_scale: float = 1.0
    rerank_center: float = 0.0
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
    # Stage 2: drop atoms whose rerank score is more than this below the best kept atom's (the best atom is
    # kept alone unless the reranker finds others nearly as likely to hold the answer: multi-hop questions).
    rerank_gap: float | None = None
    # Stage 2 in two steps: the reranker reads the stage-1 best `rerank_first` candidates, and the others only
    # when none of those scores `rerank_sure` or more (most questions find their atom among the first few, and
    # reading fewer is faster). Unset: it reads every candidate at once.
    rerank_first: int | None = None
    rerank_sure: float | None = None

    def weight(self, similarity: float, atom: AtomMetadata | None, rerank: float | None, stage2: bool) -> float:
        logit = self.sim_scale * (similarity - self.sim_center)
        if stage2:
            logit += self.rerank_scale * ((rerank or 0.0) - self.rerank_center)
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
            values[name] = _number(value) if name not in ("metadata", "max_atoms", "rerank_first") else value
        return cls(**values)


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


def _optional_float(value: Any) -> str | None:
    return None if value is None or _is_number(value) else "a finite number or null"


def _max_atoms(value: Any) -> str | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "a positive integer or null"


# field -> what is wrong with a value (None: nothing)
_HEAD_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "sim_scale": _float_field, "sim_center": _float_field, "rerank_scale": _float_field,
    "rerank_center": _float_field, "rerank_gap": _max_gap,
    "type_bias": _type_bias, "answer_bearing_bias": _float_field, "confidence_scale": _float_field,
    "metadata": _bool_field, "threshold": _threshold, "max_atoms": _max_atoms, "max_gap": _max_gap,
    "same_document": _bool_field, "rerank_first": _max_atoms, "rerank_sure": _optional_float,
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
