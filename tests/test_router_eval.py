"""`doc2atom router eval` and what it reads: routing examples from a built dataset, self-contained routing
text, BM25 / MiniLM / reranked rankings and their metrics. A real (tiny) dataset from the fresh validation file;
no language model."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from training.atomize.rules import RuleAtomizer
from training.cli import build_parser, main
from training.compile.documents import make_atomizer
from training.router.evaluate import first_gold_rank, kept_by_gap, summarise
from training.router.examples import load_examples, load_split
from training.router.routing_text import TitledAtomizer, document_about, routing_text, titled_atoms
from training.router.scorers import BM25Scorer, RerankedScorer

FRESH = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "fresh_validation.jsonl"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("router") / "fresh"
    assert main(["data", "build", "--source", str(FRESH), "--out", str(out), "--limit", "6"]) == 0
    return out


def fresh_records() -> list[dict]:
    return [json.loads(line) for line in FRESH.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_examples_have_gold_atoms_holding_the_answer_and_the_source_titles(dataset):
    bank = load_split(dataset, "validation")
    examples = load_examples(dataset, "validation", bank)
    records = {r["question"]: r for r in fresh_records()}
    assert len(bank.documents) == 6 and len(examples) == 30
    for example in examples:
        record = records[example.question]
        assert example.document_id == record["document_id"] and example.title == record["title"]
        assert example.gold and max(example.gold) < len(example.atom_texts)
        gold_text = " ".join(example.atom_texts[i] for i in example.gold).lower()
        assert any(answer.lower() in gold_text for answer in record["answers"]), (example, record["answers"])
        rows = bank.rows[example.document_id]
        assert tuple(bank.atoms[r].text for r in rows) == example.atom_texts


@pytest.mark.parametrize(("text", "title", "name", "about"), [
    ("Lumora Notes 4.2 — Release Notes\n\nWe ship it.", "Super_Bowl_50", "", "Super Bowl 50"),  # source title
    ("# The Harbor of Quillon\n\nQuillon is a town.", "", "harbor", "The Harbor of Quillon"),  # heading
    ("Halvenite\n\nHalvenite is a rare mineral.", "", "", "Halvenite"),  # short title line
    ("Thank you for your letter,\n\nwe reply soon.", "", "", ""),  # a line ending in a comma is no title
    ("it rained all day. We stayed in.", "", "release_notes-4.2", "release notes 4.2"),  # the file name in words
    ("The Harbor of Quillon lies on the coast. Ships from Quillon dock there.", "", "doc-01", "doc 01"),
    ("The Harbor of Quillon lies on the coast. Ships from Quillon dock there.", "", "", "The Harbor of Quillon"),
    ("it rained all day. We stayed in.", "", "", ""),  # nothing: no prefix
])
def test_document_about(text, title, name, about):
    assert document_about(text, title, name) == about


def test_titled_routing_text_keeps_the_atoms_text_and_span():
    text = "# The Harbor of Quillon\n\nShips dock there every day. It was built in 1743 by Odela Vance."
    plain = RuleAtomizer()("quillon", text)
    titled = TitledAtomizer(RuleAtomizer())("quillon", text)
    assert [(a.id, a.text, a.span) for a in titled] == [(a.id, a.text, a.span) for a in plain]
    assert all(a.retrieval_text == f"The Harbor of Quillon: {a.text}" for a in titled)
    assert titled == titled_atoms(plain, "The Harbor of Quillon")
    assert routing_text("", "Ships dock there.") == "Ships dock there."
    assert [a.retrieval_text for a in make_atomizer("rules")("quillon", text)] == [a.retrieval_text for a in plain]
    assert [a.retrieval_text for a in make_atomizer("rules", "titled")("quillon", text)] == \
        [a.retrieval_text for a in titled]
    assert build_parser().parse_args(["compile", "doc.txt", "--out", "bank"]).routing_text is None  # the reranker's


def test_ranks_count_ties_against_the_gold_atom_and_metrics_summarise_them():
    gold = np.array([False, True, False, False])
    assert first_gold_rank(np.array([0.1, 0.9, 0.5, 0.2]), gold) == 1
    assert first_gold_rank(np.array([0.0, 0.0, 0.0, 0.0]), gold) == 4  # BM25 without a shared word
    assert summarise([1, 2, 4, 10], (1, 3, 8)) == {"recall@1": 0.25, "recall@3": 0.5, "recall@8": 0.75,
                                                   "mrr": pytest.approx((1 + 0.5 + 0.25 + 0.1) / 4)}


def test_bm25_prefers_shared_rare_words_and_ranks_any_subset_of_rows():
    scorer = BM25Scorer(["The ferry sails at noon.", "The museum opens at nine.", "Tickets cost six pounds.",
                         "Dogs are allowed on board."])
    assert int(np.argmax(scorer.scores("When does the museum open?"))) == 1
    subset = scorer.scores("When does the museum open?", [2, 1])
    assert subset.tolist() == scorer.scores("When does the museum open?")[[2, 1]].tolist()


class _Constant:
    def __init__(self, values: list[float]) -> None:
        self.values = np.array(values)

    def scores(self, question, rows=None):
        return self.values if rows is None else self.values[list(rows)]


class _Shortest:
    """A toy reranker: the shorter the text, the more relevant."""

    text_kind = "titled"

    def score(self, question: str, texts: list[str]) -> np.ndarray:
        return -np.array([len(t) for t in texts], dtype=float)


def test_reranker_reorders_only_the_first_stages_top_k():
    texts = ["a much longer text", "short", "mid text", "tiny"]
    scorer = RerankedScorer(_Constant([0.9, 0.8, 0.7, 0.1]), _Shortest(), texts, top_k=2)
    order = np.argsort(-scorer.scores("q"))
    assert order.tolist() == [1, 0, 2, 3]  # "tiny" is shortest but outside the top 2
    assert np.argsort(-scorer.scores("q", [3, 2])).tolist() == [0, 1]


def test_reranker_reads_the_rest_only_when_none_of_the_first_is_sure():
    texts = ["a much longer text", "mid text", "a long text", "tiny"]
    base = _Constant([0.9, 0.8, 0.7, 0.6])
    sure = RerankedScorer(base, _Shortest(), texts, top_k=4, first=2, sure=-10.0)  # "mid text" scores -8
    assert np.argsort(-sure.scores("q")).tolist() == [1, 0, 2, 3] and sorted(sure.last) == [0, 1]
    unsure = RerankedScorer(base, _Shortest(), texts, top_k=4, first=2, sure=-5.0)
    assert np.argsort(-unsure.scores("q")).tolist() == [3, 1, 2, 0] and sorted(unsure.last) == [0, 1, 2, 3]


def test_kept_by_gap_keeps_the_best_and_those_near_it():
    logits = {0: 1.0, 3: 4.0, 5: 3.5, 6: -2.0}
    assert kept_by_gap(logits, frozenset({0}), 0.0, 3) == (False, 1)  # only atom 3
    assert kept_by_gap(logits, frozenset({5}), 1.0, 3) == (True, 2)
    assert kept_by_gap(logits, frozenset({0}), 10.0, 3) == (True, 3)  # at most 3: 3, 5, 0
    assert kept_by_gap(logits, frozenset({6}), 10.0, 3) == (False, 3)


@pytest.fixture
def fake_reranker(monkeypatch):
    """`training.router.reranker` opening a toy model."""
    module = types.ModuleType("training.router.reranker")
    module.open_reranker = lambda folder: _Shortest()
    monkeypatch.setitem(sys.modules, "training.router.reranker", module)


def test_cli_writes_every_method_side_by_side(dataset, tmp_path, capsys, fake_reranker):
    out = tmp_path / "results.json"
    (tmp_path / "reranker").mkdir()
    assert main(["router", "eval", "--data", str(dataset), "--out", str(out),
                 "--reranker", str(tmp_path / "reranker")]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["split"] == "validation"
    [result] = results["results"]
    assert result["questions"] == 30 and result["documents"] == 6
    methods = result["methods"]
    assert set(methods) == {"minilm_text", "minilm_key", "minilm_titled", "bm25_text", "bm25_titled", "reranker"}
    for method, scores in methods.items():
        assert method in table
        for scope in ("document", "bank"):
            metrics = scores[scope]
            assert all(0.0 <= value <= 1.0 for value in metrics.values())
            assert metrics["recall@1"] <= metrics["recall@3"] <= metrics["recall@8"]
            assert metrics["mrr"] >= metrics["recall@1"]
            assert metrics["recall@8"] >= 0.5, (method, scope, metrics)  # far better than chance
        assert scores["document"]["recall@1"] >= scores["bank"]["recall@1"] - 1e-9  # fewer candidates
        assert scores["seconds_per_question"] > 0
    for scope in ("document", "bank"):  # the reranker re-orders MiniLM's top 8: the same atoms stay in it
        assert methods["reranker"][scope]["recall@8"] == methods["minilm_titled"][scope]["recall@8"]
    kept = methods["reranker"]["kept"]
    assert 1.0 <= kept["0.0"]["mean_kept"] <= kept["4.0"]["mean_kept"] <= 3.0  # ties aside: the best alone
    assert kept["0.0"]["gold_kept"] >= methods["reranker"]["document"]["recall@1"]
    assert kept["4.0"]["gold_kept"] >= kept["0.0"]["gold_kept"] and "gold kept" in table


@pytest.mark.parametrize(("argv", "needle"), [
    (["--data", "{tmp}/no-such-dataset"], "dataset {tmp}/no-such-dataset does not exist"),
    (["--data", "{data}", "--methods", "minilm,bm25_text"], "unknown routing method minilm"),
    (["--data", "{data}", "--out", "{tmp}"], "is a folder"),
])
def test_cli_errors_are_one_line(dataset, tmp_path, capsys, argv, needle):
    argv = [a.format(tmp=tmp_path, data=dataset) for a in argv]
    assert main(["router", "eval", *argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("doc2atom router eval: error: ")
    assert needle.format(tmp=tmp_path) in lines[0]
