"""Routing: faiss stage 1 (exact and IVF), stage 2 hooks, thresholds, conflict groups, refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.bank_interface import ATOM_TYPES
from vllm_doc2atom.errors import BankError
from vllm_doc2atom.key_index import KeyIndex, KeyIndexConfig
from vllm_doc2atom.router import Router, RouterConfig
from vllm_doc2atom.router_head import DEFAULT_THRESHOLD, RouterHead

from .conftest import EXAMPLE_DOCS, make_document, make_spec


@pytest.fixture(scope="module")
def docs_bank(tmp_path_factory, tiny_model_dir, encoder) -> AtomBank:
    from .untrained_bank import build_untrained_bank, default_spec

    documents = {p.stem: p.read_text() for p in EXAMPLE_DOCS.glob("*.md")}
    spec = default_spec(tiny_model_dir, encoder, last_layers=2)
    return build_untrained_bank(tmp_path_factory.mktemp("banks") / "docs", spec, documents, encoder)


def test_exact_and_ivf_index_find_the_key_itself():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((4000, 32)).astype(np.float32)
    exact = KeyIndex(keys)
    ivf = KeyIndex(keys, KeyIndexConfig(exact_max=1000, nprobe=8))
    assert exact.exact and not ivf.exact
    queries = keys[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    for index in (exact, ivf):
        sims, ids = index.search(queries, 5)
        assert ids.shape == (200, 5)
        assert np.mean(ids[:, 0] == np.arange(200)) > 0.9
        assert np.all(np.diff(sims, axis=1) <= 1e-6)  # sorted, best first
    assert np.all(exact.search(queries, 5)[1][:, 0] == np.arange(200))


def test_in_scope_questions_route_to_their_atom_and_off_topic_is_refused(docs_bank, encoder):
    router = Router(encoder)
    cases = {
        "How tall is the Amber Needle lighthouse?": "41 meters tall",
        "Who wrote the Velmora Orchard Protocol?": "Irena Soltz",
        "Which comet did astronomers at Brightwater discover?": "Saffi-Lund",
    }
    for question, answer in cases.items():
        result = router.route(docs_bank, question)
        assert not result.refused
        # Untrained sentence keys find the answer's atom among the kept ones (a trained router ranks it first).
        assert any(answer in r.atom.text for r in result.kept[:3]), (question, [r.atom.text for r in result.kept])
        weights = [r.weight for r in result.kept]
        assert weights == sorted(weights, reverse=True) and all(0.0 <= w <= 1.0 for w in weights)
        assert all(r.weight >= DEFAULT_THRESHOLD for r in result.kept)
        assert len(result.candidates) <= router.config.top_k
    for question in ["What is the best way to cook risotto?", "Who won the football world cup in 1998?"]:
        result = router.route(docs_bank, question)
        assert result.refused and result.selection == [] and result.candidates


def test_threshold_top_k_and_max_atoms(docs_bank, encoder):
    question = "Tell me about the Brightwater Observatory telescope."
    loose = Router(encoder, RouterConfig(top_k=10, threshold_override=0.0)).route(docs_bank, question)
    assert len(loose.kept) == 10
    everything = Router(encoder, RouterConfig(top_k=100, threshold_override=0.0)).route(docs_bank, question)
    assert len(everything.kept) == len(docs_bank) == 19
    capped = Router(encoder, RouterConfig(top_k=10, threshold_override=0.0, max_atoms_cap=3)).route(docs_bank, question)
    assert [r.index for r in capped.kept] == [r.index for r in loose.kept[:3]]
    strict = Router(encoder, RouterConfig(top_k=10, threshold_override=0.9999)).route(docs_bank, question)
    assert len(strict.kept) < len(loose.kept)


def test_stage2_reranker_and_metadata_bias_reorder(docs_bank, encoder):
    question = "How tall is the Amber Needle lighthouse?"
    base = Router(encoder, RouterConfig(threshold_override=0.0)).route(docs_bank, question)
    last = base.kept[-1]

    def reranker(query, texts):
        assert query == question
        return np.array([10.0 if t == last.atom.text else -10.0 for t in texts])

    reranking = Router(encoder, RouterConfig(threshold_override=0.0, stage2=True), reranker=reranker)
    reranked = reranking.route(docs_bank, question)
    assert reranked.kept[0].index == last.index and reranked.kept[0].rerank_score == 10.0

    # Type priors that veto every type empty the result...
    veto = RouterHead(type_bias={t: -100.0 for t in ATOM_TYPES})
    assert Router(encoder, RouterConfig(stage2=True, default_head=veto)).route(docs_bank, question).refused
    # ...but stage-2 terms are ignored while stage 2 is off.
    assert not Router(encoder, RouterConfig(default_head=veto)).route(docs_bank, question).refused


def test_conflict_group_keeps_only_the_strongest(tmp_path, tiny_model_dir):
    spec = make_spec(tiny_model_dir, key_dim=4)
    doc = make_document(spec, "d", 3)
    doc.tensors["keys"] = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0]])
    doc.atoms[0].conflict_group = doc.atoms[1].conflict_group = "founding-year"
    bank = AtomBank.create(tmp_path / "b", spec, [doc])
    result = Router(FixedEncoder(), RouterConfig(threshold_override=0.0)).route(bank, "q")
    assert [r.index for r in result.kept] == [0, 2]
    assert {r.index for r in result.candidates} == {0, 1, 2}


class FixedEncoder:
    """Every question is the unit vector e0."""

    identity, dim = "test-encoder", 4

    def encode(self, texts):
        return np.tile(np.array([[1, 0, 0, 0]], np.float32), (len(texts), 1))


def test_a_banks_calibrated_threshold_applies_unless_the_server_sets_one(tmp_path, tiny_model_dir):
    # cos 1.0 -> weight 0.5 (at the default threshold: kept); cos 0.8 -> weight ~0.12 (dropped)
    head = RouterHead(sim_scale=10.0, sim_center=1.0, metadata=True)
    spec = dataclasses.replace(make_spec(tiny_model_dir, key_dim=4), router_head=dataclasses.asdict(head))
    doc = make_document(spec, "d", 2)
    doc.tensors["keys"] = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.6, 0, 0]])
    uncalibrated = AtomBank.create(tmp_path / "plain", spec, [doc])
    assert [r.index for r in Router(FixedEncoder()).route(uncalibrated, "q").kept] == [0]
    calibrated_head = dataclasses.asdict(dataclasses.replace(head, threshold=0.1))
    calibrated = AtomBank.create(tmp_path / "calibrated", dataclasses.replace(spec, router_head=calibrated_head), [doc])
    assert [r.index for r in Router(FixedEncoder()).route(calibrated, "q").kept] == [0, 1]
    server_wins = Router(FixedEncoder(), RouterConfig(threshold_override=0.9))
    assert server_wins.route(calibrated, "q").refused


def test_key_space_mismatch_is_a_bank_error(bank, encoder):
    with pytest.raises(BankError, match="keyed by 'test-encoder'") as err:
        Router(encoder).route(bank, "anything")
    assert err.value.kind == "mismatch"


def test_index_is_cached_per_bank_content(docs_bank, encoder, spec):
    router = Router(encoder)
    assert router.index_for(docs_bank) is router.index_for(docs_bank)
    reloaded = AtomBank.load(docs_bank.path)
    assert router.index_for(reloaded) is router.index_for(docs_bank)  # same content, same fingerprint


def test_a_malformed_router_head_is_a_bank_error(tiny_model_dir):
    # Refused when the spec is built (and so when a manifest loads), never later mid-routing.
    with pytest.raises(BankError, match="malformed router head: unknown fields"):
        dataclasses.replace(make_spec(tiny_model_dir, key_dim=4), router_head={"sim_scale": 1.0, "bogus": 2})


def test_max_gap_drops_atoms_far_below_the_best_match(docs_bank, encoder):
    question = "How tall is the Amber Needle lighthouse?"
    plain = Router(encoder).route(docs_bank, question)
    gapped = Router(encoder, RouterConfig(default_head=RouterHead(max_gap=0.1))).route(docs_bank, question)
    best = plain.kept[0].similarity
    assert any(r.similarity < best - 0.1 for r in plain.kept)  # the question routes far-below-top atoms too
    assert [r.index for r in gapped.kept] == [r.index for r in plain.kept if r.similarity >= best - 0.1]
    assert RouterHead.from_dict({"max_gap": 0.2}).max_gap == 0.2
    with pytest.raises(BankError, match="max_gap"):
        RouterHead.from_dict({"max_gap": -1})


def test_same_document_keeps_only_the_best_atoms_document(docs_bank, encoder):
    question = "How tall is the Amber Needle lighthouse?"
    plain = Router(encoder, RouterConfig(default_head=RouterHead(max_atoms=3))).route(docs_bank, question)
    assert len({r.atom.document_id for r in plain.kept}) > 1  # the question routes another document's atoms too
    head = RouterHead(max_atoms=3, same_document=True)
    kept = Router(encoder, RouterConfig(default_head=head)).route(docs_bank, question).kept
    assert kept and kept[0].index == plain.kept[0].index
    assert {r.atom.document_id for r in kept} == {plain.kept[0].atom.document_id}
    assert RouterHead.from_dict({"same_document": True}).same_document is True
    with pytest.raises(BankError, match="same_document"):
        RouterHead.from_dict({"same_document": "yes"})
