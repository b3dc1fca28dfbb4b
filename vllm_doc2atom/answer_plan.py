"""What a routed request gets — a refusal, the base model, the atoms' text, or a composed adapter — and the
provenance that says so. Decided here without any HTTP; the middleware only carries the plan out."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .bank_interface import RoutableBank
from .composer import adapter_identity, fit_rank_budget
from .errors import RequestError
from .router import RoutedAtom, RoutingResult


class Action(Enum):
    REFUSE = "refuse"  # no atom covers the question: the refusal message, no model call
    BASE_MODEL = "base"  # no atom covers it, and the server lets the base model answer (--doc2atom-on-refusal base)
    EVIDENCE_ONLY = "evidence-only"  # the base model reads the routed atoms' text; nothing is composed
    ADAPTER = "adapter"  # the routed atoms composed into one LoRA (with their text too, if evidence is on)


@dataclass
class AnswerPlan:
    action: Action
    provenance: dict[str, Any]  # what the response says about the atoms used
    evidence: list[str] = field(default_factory=list)  # atom texts to put before the question
    selection: list[tuple[int, float]] = field(default_factory=list)  # ADAPTER: (bank row, weight) to compose
    adapter_name: str = ""  # ADAPTER: content hashes of the selection, so equal selections share one adapter
    adapter_id: int = 0


def plan_answer(bank: RoutableBank, bank_names: str | list[str], result: RoutingResult, evidence: str,
                on_refusal: str, max_lora_rank: int) -> AnswerPlan:
    """`evidence`: "off", "with-adapter" or "only"; `on_refusal`: "refuse" or "base"."""
    several = isinstance(bank_names, list)

    def provenance_of(atoms: list[RoutedAtom]) -> list[dict[str, Any]]:
        return [r.provenance(bank.bank_name_of(r.index) if several else None) for r in atoms]

    provenance: dict[str, Any] = {"atom_bank": bank_names, "refused": result.refused,
                                  "atoms": provenance_of(result.kept)}
    if result.refused:
        return AnswerPlan(Action.REFUSE if on_refusal == "refuse" else Action.BASE_MODEL, provenance)
    if evidence == "only":
        provenance["evidence"] = "only"
        return AnswerPlan(Action.EVIDENCE_ONLY, provenance, evidence=[r.atom.text for r in result.kept])

    used, dropped = fit_rank_budget(result.selection, bank.spec.micro_rank, max_lora_rank)
    if not used:
        raise RequestError(f"atoms of bank {bank_names!r} have rank {bank.spec.micro_rank}, above the server's "
                           f"--max-lora-rank {max_lora_rank}", status=409, param="atom_bank")
    name, int_id = adapter_identity(bank.fingerprint, used)
    used_rows = {row for row, _ in used}
    kept = [r for r in result.kept if r.index in used_rows]
    provenance["atoms"] = provenance_of(kept)
    if dropped:
        provenance["dropped_for_rank"] = [bank.atoms[row].id for row, _ in dropped]
    provenance.update(adapter=name, rank=len(used) * bank.spec.micro_rank)
    texts = [r.atom.text for r in kept] if evidence == "with-adapter" else []
    if texts:
        provenance["evidence"] = True
    return AnswerPlan(Action.ADAPTER, provenance, evidence=texts, selection=used, adapter_name=name,
                      adapter_id=int_id)
