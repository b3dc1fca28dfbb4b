"""The request path's decision, without a server: refuse, let the base model answer, answer from the atoms'
text, or compose an adapter — and the provenance each answer carries."""

from __future__ import annotations

import pytest

from vllm_doc2atom.answer_plan import Action, plan_answer
from vllm_doc2atom.bank_union import BankUnion
from vllm_doc2atom.errors import RequestError
from vllm_doc2atom.router import RoutedAtom, RoutingResult


def _routed(bank, rows_weights: list[tuple[int, float]]) -> RoutingResult:
    kept = [RoutedAtom(row, bank.atoms[row], similarity=0.9, rerank_score=None, weight=w) for row, w in rows_weights]
    return RoutingResult(query="q", kept=kept, candidates=kept)


def test_nothing_routed_is_refused_or_left_to_the_base_model(bank):
    refused = _routed(bank, [])
    plan = plan_answer(bank, "bank", refused, "off", "refuse", max_lora_rank=64)
    assert plan.action is Action.REFUSE and not plan.selection
    assert plan.provenance == {"atom_bank": "bank", "refused": True, "atoms": []}
    assert plan_answer(bank, "bank", refused, "only", "base", max_lora_rank=64).action is Action.BASE_MODEL


def test_evidence_only_composes_nothing(bank):
    plan = plan_answer(bank, "bank", _routed(bank, [(1, 0.9), (0, 0.6)]), "only", "refuse", max_lora_rank=64)
    assert plan.action is Action.EVIDENCE_ONLY and not plan.selection and not plan.adapter_name
    assert plan.evidence == [bank.atoms[1].text, bank.atoms[0].text]
    assert plan.provenance["evidence"] == "only" and [a["id"] for a in plan.provenance["atoms"]] == \
        [bank.atoms[1].id, bank.atoms[0].id]


def test_adapter_keeps_the_heaviest_atoms_that_fit_the_rank(bank):
    rank = bank.spec.micro_rank
    result = _routed(bank, [(2, 0.9), (0, 0.7), (5, 0.4)])
    plan = plan_answer(bank, "bank", result, "with-adapter", "refuse", max_lora_rank=2 * rank)
    assert plan.action is Action.ADAPTER and plan.selection == [(0, 0.7), (2, 0.9)]  # by row: stable names
    assert plan.provenance["dropped_for_rank"] == [bank.atoms[5].id]
    assert [a["id"] for a in plan.provenance["atoms"]] == [bank.atoms[2].id, bank.atoms[0].id]
    assert plan.provenance["rank"] == 2 * rank and plan.provenance["adapter"] == plan.adapter_name
    assert plan.evidence == [bank.atoms[2].text, bank.atoms[0].text] and plan.provenance["evidence"] is True
    again = plan_answer(bank, "bank", result, "off", "refuse", max_lora_rank=2 * rank)
    assert (again.adapter_name, again.adapter_id) == (plan.adapter_name, plan.adapter_id) and not again.evidence
    with pytest.raises(RequestError, match="max-lora-rank") as err:
        plan_answer(bank, "bank", result, "off", "refuse", max_lora_rank=rank - 1)
    assert err.value.status == 409


def test_several_banks_name_each_atoms_bank(bank):
    union = BankUnion([bank, bank], names=["a", "b"])
    plan = plan_answer(union, ["a", "b"], _routed(union, [(len(bank), 0.9), (0, 0.8)]), "off", "refuse", 64)
    assert [a["atom_bank"] for a in plan.provenance["atoms"]] == ["b", "a"]
    single = plan_answer(bank, "bank", _routed(bank, [(0, 0.8)]), "off", "refuse", 64)
    assert "atom_bank" not in single.provenance["atoms"][0]
