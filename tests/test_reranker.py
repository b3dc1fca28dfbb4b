"""The shipped stage-2 reranker served: loaded by identity, routing banks that record it, never silently skipped."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.bank_interface import RerankerIdentity
from vllm_doc2atom.errors import BankError, BankErrorKind
from vllm_doc2atom.reranker import (
    CARD,
    SHIPPED_FOLDER,
    WEIGHTS,
    load_reranker,
    reranker_for,
    shipped_identity,
)
from vllm_doc2atom.router import Router, keep_atoms
from vllm_doc2atom.router_head import RouterHead

from .conftest import EXAMPLE_DOCS

# A validation document's atoms (benchmarks/data/fresh_validation.jsonl) as the reranker reads them. MiniLM ranks
# the atom sharing the question's words ("Threadview feature") first; the reranker the one that answers (3).
ABOUT = "Lumora Notes 4.2 Release Notes: "
ATOMS = [ABOUT + text for text in (
    "Lumora Notes 4.2 — Release Notes (published 14 March 2031)",
    "We're happy to ship version 4.2 of Lumora Notes, which our team at Brindlecap Labs has been polishing since "
    "the winter beta.",
    "The headline feature is Threadview, a sidebar that groups related notes automatically",
    "Lumora Notes 4 was designed by our lead engineer, Pascale Odunmbe, after users asked for it in last year's "
    "survey.",
    "Sync is faster, too: a typical library of 5,000 notes now syncs in about 11 seconds, down from roughly 40.",
    "We've also fixed the bug that caused pinned notes to vanish when the app was opened offline.")]
QUESTION = "Who designed the Threadview feature in Lumora Notes?"


@pytest.fixture(scope="module")
def shipped():
    return reranker_for(shipped_identity())


@pytest.fixture(scope="module")
def reranked_bank(tmp_path_factory, tiny_model_dir, encoder) -> AtomBank:
    """The example documents' atoms, with the spec of a bank compiled with the shipped reranker."""
    from .untrained_bank import build_untrained_bank, default_spec

    documents = {p.stem: p.read_text() for p in EXAMPLE_DOCS.glob("*.md")}
    spec = dataclasses.replace(default_spec(tiny_model_dir, encoder, last_layers=2),
                               router_head=dataclasses.asdict(RouterHead(sim_scale=0.0, max_atoms=3)),
                               reranker=shipped_identity().to_dict())
    return build_untrained_bank(tmp_path_factory.mktemp("banks") / "reranked", spec, documents, encoder)


def test_the_shipped_reranker_is_small_safetensors_with_a_card():
    identity = shipped_identity()
    assert identity is not None and identity.name.startswith("doc2atom-rerank")
    assert {p.name for p in SHIPPED_FOLDER.iterdir()} == {WEIGHTS, CARD}
    assert (SHIPPED_FOLDER / WEIGHTS).stat().st_size < 24_000_000  # the trained layers only, float16
    card = json.loads((SHIPPED_FOLDER / CARD).read_text())
    assert card["train_split"] == "train" and card["text"] == "titled" and card["validation_summary"]


def test_shipped_reranker_finds_the_answering_atom_that_minilm_ranks_lower(shipped, encoder):
    cosine = encoder.encode([QUESTION]) @ encoder.encode(ATOMS).T
    assert int(np.argmax(cosine)) == 2  # stage 1 alone gets it wrong
    scores = shipped(QUESTION, ATOMS)
    assert scores.shape == (6,) and int(np.argmax(scores)) == 3
    assert shipped is reranker_for(shipped_identity())  # loaded once per process


def test_a_bank_that_records_the_reranker_is_routed_with_it(reranked_bank, encoder, shipped):
    question = "How tall is the Amber Needle lighthouse?"
    result = Router(encoder).route(reranked_bank, question)  # no stage-2 flag: the bank's spec decides
    assert result.kept and all(c.rerank_score is not None for c in result.candidates)
    assert "41 meters" in result.kept[0].atom.text
    texts = [c.atom.retrieval_text or c.atom.text for c in result.candidates]
    expected = 1 / (1 + np.exp(-shipped(question, texts)))  # weight = P(holds the answer)
    assert np.allclose([c.weight for c in result.candidates], expected, atol=1e-4)
    assert result.kept[0].provenance()["rerank_score"] == round(result.kept[0].rerank_score, 4)


def test_a_missing_or_changed_reranker_is_a_bank_error_never_stage_one(reranked_bank, tmp_path, encoder):
    unknown = RerankerIdentity("trained-elsewhere", "ab" * 32)
    path = tmp_path / "bank"
    shutil.copytree(reranked_bank.path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["spec"]["reranker"] = unknown.to_dict()
    (path / "manifest.json").write_text(json.dumps(manifest))
    bank = AtomBank.load(path)
    with pytest.raises(BankError, match="trained-elsewhere") as err:
        Router(encoder).route(bank, "How tall is the Amber Needle lighthouse?")
    assert err.value.kind is BankErrorKind.INVALID and err.value.kind.http_status == 422
    manifest["spec"]["reranker"] = {"name": "x"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="malformed reranker"):
        AtomBank.load(path)


def test_a_banks_own_reranker_copy_is_found_by_its_hash(reranked_bank, tmp_path, encoder):
    path = tmp_path / "bank"
    shutil.copytree(reranked_bank.path, path)
    own = path / "reranker"
    shutil.copytree(SHIPPED_FOLDER, own)
    card = json.loads((own / CARD).read_text())
    (own / CARD).write_text(json.dumps({**card, "name": "my-reranker"}))
    identity = load_reranker(own).identity
    assert identity.name == "my-reranker" and identity.sha256 == shipped_identity().sha256
    found = reranker_for(RerankerIdentity("my-reranker", identity.sha256), AtomBank.load(path).reranker_folders())
    assert found(QUESTION, ATOMS).shape == (6,)


def test_rerank_gap_keeps_the_best_atom_alone_unless_others_are_close(reranked_bank, encoder):
    question = "How tall is the Amber Needle lighthouse?"
    candidates = Router(encoder).route(reranked_bank, question).candidates
    best = candidates[0].rerank_score
    for gap in (0.0, 3.0, 100.0):
        kept = keep_atoms(candidates, RouterHead(sim_scale=0.0, rerank_gap=gap, max_atoms=8), 0.0)
        assert [c.index for c in kept] == [c.index for c in candidates if c.rerank_score >= best - gap]
    assert RouterHead.from_dict({"rerank_gap": 2.0, "rerank_center": -1}).rerank_center == -1.0
    with pytest.raises(BankError, match="rerank_gap"):
        RouterHead.from_dict({"rerank_gap": -1})



def test_the_reranker_reads_the_rest_of_the_candidates_only_when_unsure():
    from vllm_doc2atom.bank_interface import AtomRecord
    from vllm_doc2atom.router import weigh_candidates

    atoms = [AtomRecord(id=f"d#{i}", document_id="d", type="fact_claim", text=f"atom {i}", span=(0, 6))
             for i in range(8)]
    hits = [(i, 0.9 - 0.05 * i) for i in range(8)]  # stage 1's order
    logits = {"sure": [0.5, 3.0, -1.0, 0.0, 9.0, 9.0, 9.0, 9.0], "unsure": [0.5, 1.0, -1.0, 0.0, 4.0, 0, 0, 0]}
    head = RouterHead(sim_scale=0.0, rerank_first=4, rerank_sure=2.0)
    for case, expected_reads in (("sure", [4]), ("unsure", [4, 4])):
        reads = []

        def reranker(question, texts, case=case, reads=reads):
            start = sum(reads)
            reads.append(len(texts))
            return np.asarray(logits[case][start : start + len(texts)])

        candidates = weigh_candidates("q", hits, atoms, head, reranker, stage2=True)
        assert reads == expected_reads
        assert len(candidates) == sum(expected_reads)  # an atom the reranker did not read is no candidate
        assert candidates[0].index == (1 if case == "sure" else 4)
    reads = []
    weigh_candidates("q", hits, atoms, RouterHead(sim_scale=0.0), lambda q, t: reads.append(len(t)) or np.zeros(len(t)),
                     stage2=True)
    assert reads == [8]  # a head without rerank_first (banks compiled before it): all at once, as before
    assert RouterHead.from_dict({"rerank_first": 4, "rerank_sure": 2}).rerank_sure == 2.0
    for bad in ({"rerank_first": 0}, {"rerank_first": 2.5}, {"rerank_sure": "high"}):
        with pytest.raises(BankError, match=next(iter(bad))):
            RouterHead.from_dict(bad)
