"""Atomization, labels, probes, splits, the synthetic corpus, teacher targets and `doc2atom data build`."""

from __future__ import annotations

import json

import pytest

from training.atomize.rules import RuleAtomizer
from training.data.cross_document_probes import off_topic_probes
from training.data.labels import label_question
from training.data.records import ANSWERABLE, OFF_TOPIC, UNANSWERABLE, Question
from training.data.splits import split_of
from training.data.synthetic import synthetic_corpus

from .conftest import EXAMPLE_DOCS

TEXT = ("# Marie Curie\n\nMarie Curie was a physicist. She discovered polonium in 1898, and she won the Nobel Prize "
        "in 1903 for her work on radiation. Her laboratory stood in Paris; it was 12 meters long.\n\n"
        "First, heat the oven. Then bake the bread for twenty minutes. A survey showed that most bakers agree.")


def test_rule_atomizer_spans_types_and_self_contained_text():
    atoms = RuleAtomizer()("curie", TEXT)
    for atom in atoms:
        assert TEXT[atom.span[0] : atom.span[1]].strip() and atom.document_id == "curie"
    by_span = {TEXT[a.span[0] : a.span[1]]: a for a in atoms}
    assert "# Marie Curie" not in by_span  # headings name the entity, they are not atoms
    discovered = by_span["She discovered polonium in 1898"]
    assert discovered.text == "Marie Curie discovered polonium in 1898" and discovered.type == "event_relation"
    assert discovered.confidence < 1.0 and discovered.answer_bearing
    assert by_span["she won the Nobel Prize in 1903 for her work on radiation."].text.startswith("Marie Curie won")
    assert by_span["Her laboratory stood in Paris"].text == "Marie Curie's laboratory stood in Paris"
    assert by_span["it was 12 meters long."].type == "entity_attribute"
    assert by_span["First, heat the oven."].type == "process_step"
    assert by_span["A survey showed that most bakers agree."].type == "evidence_fragment"
    assert by_span["Marie Curie was a physicist."].text == "Marie Curie was a physicist."
    assert [a.id for a in atoms] == [f"curie#{i}" for i in range(len(atoms))]
    assert atoms[2].relations == [{"type": "follows", "target": atoms[1].id}]
    assert RuleAtomizer()("curie", TEXT) == atoms  # deterministic


def test_example_documents_atomize_into_sentences_with_verified_spans():
    for path in EXAMPLE_DOCS.glob("*.md"):
        text = path.read_text()
        atoms = RuleAtomizer()(path.stem, text)
        assert len(atoms) >= 5
        assert all(not text[a.span[0] : a.span[1]].startswith("#") for a in atoms)


def test_chunk_atomizer_windows_cover_the_document():
    from training.atomize.chunks import ChunkAtomizer

    atoms = ChunkAtomizer(words=5)("c", TEXT)
    assert len(atoms) == -(-len(TEXT.split()) // 5)
    assert all(TEXT[a.span[0] : a.span[1]] == a.text for a in atoms)
    assert " ".join(a.text for a in atoms).split() == TEXT.split()


def test_labels_from_answer_offsets_text_and_evidence():
    atoms = RuleAtomizer()("curie", TEXT)
    start = TEXT.index("1898")
    q = Question(id="q", document_id="curie", question="When?", answers=["1898"], answer_starts=[start])
    labels = label_question(q, atoms, TEXT)
    assert [TEXT[a.span[0]:a.span[1]] for a in atoms if a.id in labels.gold] == ["She discovered polonium in 1898"]
    assert len(labels.distractors) == len(atoms) - 1
    unknown = Question(id="q2", document_id="curie", question="Where?", answers=["Paris"], answer_starts=[-1])
    assert len(label_question(unknown, atoms, TEXT).gold) == 1
    paris = TEXT.index("Her laboratory")
    multi_hop = Question(id="q3", document_id="curie", question="Long lab?", answers=["12 meters"],
                         supporting_spans=[(paris, paris + 30)])
    labels = label_question(multi_hop, atoms, TEXT)
    assert len(labels.gold) == 1 and len(labels.supporting) == 1
    yes_no = Question(id="q4", document_id="curie", question="Paris?", answers=["yes"],
                      supporting_spans=[(paris, paris + 30)])
    assert len(label_question(yes_no, atoms, TEXT).gold) == 1  # evidence answers a yes/no question
    probe = Question(id="q5", document_id="curie", question="?", kind=UNANSWERABLE)
    assert label_question(probe, atoms, TEXT).distractors == [a.id for a in atoms]


def test_synthetic_corpus_is_fictional_verbatim_and_deterministic():
    corpus = synthetic_corpus(9, seed=3)
    assert len(corpus.documents) == 9 and len(corpus.questions) >= 9 * 5
    for q in corpus.questions:
        text = corpus.documents[q.document_id].text
        assert text[q.answer_starts[0] : q.answer_starts[0] + len(q.answers[0])] == q.answers[0]
    assert synthetic_corpus(9, seed=3) == corpus and synthetic_corpus(9, seed=4) != corpus
    atoms_by_doc = {d: RuleAtomizer()(d, doc.text) for d, doc in corpus.documents.items()}
    labelled = [label_question(q, atoms_by_doc[q.document_id], corpus.documents[q.document_id].text)
                for q in corpus.questions]
    assert all(lab.gold for lab in labelled)


def test_off_topic_probes_come_from_other_documents():
    corpus = synthetic_corpus(12, seed=0)
    probes = off_topic_probes(corpus, per_document=2, seed=1)
    assert len(probes) == 24 and all(p.kind == OFF_TOPIC and not p.answers for p in probes)
    by_id = {q.id: q for q in corpus.questions}
    for probe in probes:
        source = by_id[probe.id.split("@")[0]]
        assert source.document_id != probe.document_id and source.question == probe.question
        answer = source.answers[0].lower()  # short answers ("12") may appear inside other numbers: not checked
        assert len(answer) <= 2 or answer not in corpus.documents[probe.document_id].text.lower()
    assert off_topic_probes(corpus, per_document=2, seed=1) == probes


def test_splits_are_by_document_and_stable():
    ids = [f"doc-{i}" for i in range(2000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "validation", "test")}
    assert 0.75 < share["train"] < 0.85 and 0.07 < share["test"] < 0.13 and 0.07 < share["validation"] < 0.13


def test_data_build_cli_with_teacher_targets_and_resume(tmp_path, tiny_model_dir, capsys):
    from training.cli import main
    from training.data.teacher import load_teacher_targets

    out = tmp_path / "data"
    argv = ["data", "build", "--source", "synthetic", "--limit", "4", "--out", str(out),
            "--model", str(tiny_model_dir), "--teacher-backend", "transformers", "--top-k", "4"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert printed["counts"] == manifest["counts"] and manifest["counts"]["documents"] == 4
    assert printed["teacher"]["device"] in ("cpu", "cuda:0") and manifest["config"]["teacher_device"] == "auto"
    questions = [json.loads(line) for line in (out / "questions.jsonl").open()]
    documents = {d["id"]: d for d in map(json.loads, (out / "documents.jsonl").open())}
    atoms = [json.loads(line) for line in (out / "atoms.jsonl").open()]
    assert len(atoms) == manifest["counts"]["atoms"] == sum(manifest["counts"]["atoms_per_type"].values())
    assert {q["kind"] for q in questions} == {ANSWERABLE, OFF_TOPIC}
    for q in questions:
        assert q["split"] == documents[q["document_id"]]["split"]
        assert bool(q["labels"]["gold"]) == (q["kind"] == ANSWERABLE)

    targets = load_teacher_targets(out / "teacher")
    assert set(targets) == {q["id"] for q in questions}
    for q in questions:
        target = targets[q["id"]]
        assert target["topk_ids"].shape == (len(target["tokens"]), 4) == target["topk_logprobs"].shape
        assert target["refusal"] == (q["kind"] != ANSWERABLE)
        if not target["refusal"]:
            assert (target["topk_logprobs"][:, 0] >= target["topk_logprobs"][:, 1]).all()
            assert (target["topk_ids"][:, 0] == target["tokens"]).all()  # greedy: the top token is the answer
    assert main(argv) == 0  # resume: everything is cached
    assert json.loads(capsys.readouterr().out)["teacher"] == {"generated": 0, "cached": len(questions)}


@pytest.mark.parametrize("source", ["squad2", "hotpotqa"])
def test_data_build_on_packaged_sources(tmp_path, source):
    from training.data.build import BuildConfig, build_dataset

    manifest = build_dataset(BuildConfig(source=source, out=tmp_path, limit=20))
    counts = manifest["counts"]
    assert counts["documents"] == 20 and counts["atoms"] > 20
    answerable = counts["questions_per_kind"]["answerable"]
    assert counts["answerable_with_gold_atoms"] >= 0.9 * answerable
    if source == "squad2":
        assert counts["questions_per_kind"]["unanswerable"] > 0


def test_vllm_teacher_backend_matches_transformers(tmp_path, tiny_model_dir):
    """The vLLM offline engine and transformers give the same greedy answers and top-k (fp32 tiny model)."""
    from training.data.teacher import TeacherConfig, build_teacher_targets, load_teacher_targets

    corpus = synthetic_corpus(2, seed=5)
    questions = corpus.questions[:3]
    results = {}
    for backend in ("vllm", "transformers"):
        config = TeacherConfig(model=str(tiny_model_dir), backend=backend, top_k=4, max_new_tokens=6,
                               max_model_len=1024)
        build_teacher_targets(questions, corpus.documents, tmp_path / backend, config)
        results[backend] = load_teacher_targets(tmp_path / backend)
    for q in questions:
        vllm, hf = results["vllm"][q.id], results["transformers"][q.id]
        assert vllm["tokens"].tolist() == hf["tokens"].tolist()
        assert (vllm["topk_logprobs"] - hf["topk_logprobs"]).abs().max() < 1e-2
