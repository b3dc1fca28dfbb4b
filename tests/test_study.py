"""Self-study compilation (`doc2atom compile --mode study`): questions, prefix-shared generation, joint fitting
of a document's atoms as they are served, calibration, the content cache — on tiny Llama and Gemma2 models."""

from __future__ import annotations

import json

import pytest
import torch

from training.atomize.rules import RuleAtomizer, RuleAtomizerConfig
from training.device import DeviceConfig
from training.study import questions as q
from training.study.fit import CompositionSampler, Example, FitConfig, fit_document, fit_steps, length_batches
from training.study.generation import chat_prompt_ids, generate, split_common_prefix
from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.bank_interface import Target
from vllm_doc2atom.reranker import shipped_identity

from .conftest import EXAMPLE_DOCS

portable = pytest.mark.portable  # no vLLM, no packaged model: scripts/gpu_check.sh runs them on the GPU
# the GPU when there is one (float32: compared with transformers' own generate), else the CPU
DEVICE = DeviceConfig.from_flags("auto", "float32")


@portable
def test_span_questions_ask_for_each_answer_span_with_its_wh_phrase():
    asked = q.span_questions("The harbor of Quillon was built in 1743 by the shipwright Odela Vance.")
    assert "The harbor of Quillon was built in which year by the shipwright Odela Vance?" in asked
    assert "The harbor of Quillon was built in 1743 by the shipwright who?" in asked
    assert q.span_questions("Its lighthouse is 41 meters tall.") == ["Its lighthouse is how many meters tall?"]
    assert q.span_questions("It was nice.") == []  # nothing to ask for
    assert q.span_questions("In 1994 astronomers found a comet.")[0] == "When astronomers found a comet?"


@portable
def test_clipped_span_questions_end_with_the_asked_spans_clause():
    atom = "The harbor master today is Teodor Plash, who keeps a ledger of every ship that enters."
    pairs = q.span_questions_with_answers(atom, clipped=True)
    assert [question for question, _ in pairs] == [
        "The harbor master today is who, who keeps a ledger of every ship that enters?",
        "The harbor master today is who?"]
    assert {answer for _, answer in pairs} == {atom}  # both are answered with the atom's text
    assert len(q.span_questions_with_answers("Its lighthouse is 41 meters tall.", clipped=True)) == 1  # no clause


@portable
def test_model_questions_are_kept_only_when_they_are_questions_about_the_atom():
    atom = "The harbor master today is Teodor Plash, who keeps a ledger of every ship."
    assert q.clean_model_question('Question: "Who is the harbor master today?" I hope', atom) == \
        "Who is the harbor master today?"
    assert q.clean_model_question("What is the answer to this question?", atom) is None  # about the task
    assert q.clean_model_question("Who won the 1998 world cup?", atom) is None  # about something else
    assert q.clean_model_question("The harbor master is Teodor Plash.", atom) is None  # not a question
    assert q.document_subject("# The Harbor of Quillon\n\nQuillon is a town.") == "The Harbor of Quillon"


@portable
def test_prefix_shared_generation_matches_transformers_generate(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = DEVICE.load_causal_lm(tiny_model_dir)
    document = "The Amber Needle is 41 meters tall. " * 3
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": document + question}])
               for question in ("How tall is it?", "Who built the harbor of Quillon?", "Why?")]
    prefix, rests = split_common_prefix(prompts)
    assert len(prefix) > 10 and all(prefix + rest == p for rest, p in zip(rests, prompts))
    ours = generate(model, tokenizer, prompts, 6, top_k=4)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt], device=DEVICE.torch_device)
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=0)
        tokens = reference.sequences[0, len(prompt):].tolist()[: len(got.tokens)]
        assert got.tokens == tokens
        top = torch.log_softmax(torch.stack(reference.logits)[: len(got.tokens), 0], -1).topk(4, -1)
        assert got.topk_logprobs.device.type == "cpu"  # whatever the model's device
        torch.testing.assert_close(got.topk_logprobs, top.values.cpu(), atol=1e-4, rtol=0)


@portable
def test_compositions_follow_the_router_add_distractors_and_protect_unrelated_prompts():
    composer = CompositionSampler(5, FitConfig(router_share=1.0, alone_share=0.0))
    routed = Example(2, [1], torch.tensor([3]), torch.tensor([[3]]), torch.tensor([[0.0]]), routed=[(4, 0.9)])
    assert dict(composer.draw(routed)).keys() == {2, 4}  # the router missed the gold atom: it is added
    composer = CompositionSampler(5, FitConfig(router_share=0.0, alone_share=0.0, max_distractors=2))
    for _ in range(20):
        drawn = composer.draw(routed)
        assert drawn[0][0] == 2 and 2 <= len(drawn) <= 3 and len({i for i, _ in drawn}) == len(drawn)
    protection = Example(-1, [1], torch.tensor([3]), torch.tensor([[3]]), torch.tensor([[0.0]]))
    assert all(0.3 <= w <= 1.0 for _, w in composer.draw(protection))
    rows, weights = composer.batch([routed, protection])
    assert rows.shape == weights.shape and (weights >= 0).all()


@portable
def test_fitting_a_documents_atoms_together_lowers_the_distillation_loss(tiny_model_dir):
    model = DEVICE.load_causal_lm(tiny_model_dir)
    targets = [Target("down_proj", 3)]
    generator = torch.Generator().manual_seed(0)
    examples = []
    for atom in range(3):
        answer = torch.randint(5, 100, (4,), generator=generator)
        ids = torch.full((4, 2), -1)
        ids[:, 0] = answer
        examples.append(Example(atom, [1, 7 + atom, 9], answer, ids, torch.zeros(4, 2)))
    shapes = {"down_proj": (256, 128)}
    result = fit_document(model, targets, 3, 2, 1.0, examples, shapes, FitConfig(steps=60, lr=5e-2, batch_size=3))
    assert result.loss_last < 0.8 * result.loss_first  # seeded: random compositions make single steps noisy
    assert result.a[targets[0]].shape == (3, 2, 256) and result.b[targets[0]].shape == (3, 128, 2)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_study_compile_needs_no_checkpoint_caches_by_content_and_adds(tmp_path, monkeypatch, capsys, arch):
    from training.cli import main
    from training.models import build_tiny_model

    monkeypatch.setenv("DOC2ATOM_CACHE", str(tmp_path / "cache"))
    model = build_tiny_model(tmp_path / arch, arch=arch)
    docs = [str(p) for p in sorted(EXAMPLE_DOCS.glob("*.md"))]
    common = ["--model", str(model), "--steps", "3", "--model-questions", "1"]
    assert main(["compile", *docs[:2], "--out", str(tmp_path / "bank"), *common]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["mode"] == "study" and stats["documents"] == 2 and stats["atoms"] > 5
    assert stats["seconds_per_atom"] > 0 and stats["bytes_per_atom"] > 0 and stats["peak_memory_mb"] > 0
    assert set(stats["stage_seconds"]) >= {"questions", "teacher", "fit"}
    bank = AtomBank.load(tmp_path / "bank")
    head = bank.spec.router_head
    assert 0.0 < head["threshold"] < 1.0 and head["max_atoms"] == 3  # calibrated on its own study questions
    assert bank.spec.reranker == shipped_identity().to_dict() and head["rerank_gap"] is not None  # routed by it
    assert all(a.retrieval_text.endswith(": " + a.text) for a in bank.atoms)  # "<its heading>: <atom>"
    assert bank.spec.checkpoint.startswith("self-study") and "+proj" not in bank.spec.key_encoder
    a = bank.factors([0])[bank.spec.targets[0]][0]
    assert torch.isfinite(a).all() and a.abs().sum() > 0

    # the same documents again: every one comes from the content cache
    assert main(["compile", *docs[:2], "--out", str(tmp_path / "again"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["stage_seconds"]["cached_documents"] == 2
    # ... unless the atomizer now cuts a document differently: its fit is stale (the other one stays cached)
    with monkeypatch.context() as patched:
        patched.setattr("training.compile.documents.RuleAtomizer",
                        lambda: RuleAtomizer(RuleAtomizerConfig(split_clauses=False)))
        assert main(["compile", *docs[:2], "--out", str(tmp_path / "recut"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["stage_seconds"]["cached_documents"] == 1
    # existing bank without --overwrite / --add: a clear error, nothing touched
    assert main(["compile", docs[2], "--out", str(tmp_path / "bank"), *common]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --add: one more document, the others' shards untouched
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bank" / "shards").iterdir()}
    assert main(["compile", docs[2], "--out", str(tmp_path / "bank"), "--add", *common]) == 0
    capsys.readouterr()
    grown = AtomBank.load(tmp_path / "bank")
    assert len(grown.document_ids) == 3 and grown.spec.router_head == head
    assert all((tmp_path / "bank" / "shards" / name).stat().st_mtime_ns == t for name, t in shards.items())
    # another adapter shape cannot join this bank
    assert main(["compile", docs[2], "--out", str(tmp_path / "bank"), "--add", "--rank", "2", *common]) == 2
    assert "compile into a new bank" in capsys.readouterr().err


def _run_benchmark(name: str, tmp_path, tiny_model_dir, monkeypatch, documents: int, probes: int, *args: str):
    """benchmarks/<name>.py's main() on a synthetic dataset built with the tiny model as teacher; the module."""
    import importlib
    import sys
    from pathlib import Path

    from training.data.build import BuildConfig, build_dataset

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    module = importlib.import_module(name)
    data = tmp_path / "data"
    build_dataset(BuildConfig(source="synthetic", out=data, limit=documents, teacher_model=str(tiny_model_dir),
                              teacher_backend="transformers", top_k=4, probes_per_document=probes))
    split = json.loads((data / "questions.jsonl").read_text().splitlines()[0])["split"]
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--data", str(data), "--split", split,
                                      "--model", str(tiny_model_dir), *args])
    module.main()
    return module


def test_adapter_shape_benchmark_measures_each_shape(tmp_path, tiny_model_dir, monkeypatch):
    """benchmarks/study_shapes.py end to end on a tiny model: one row per shape, JSON and plot written."""
    out = tmp_path / "shapes.json"
    study_shapes = _run_benchmark("study_shapes", tmp_path, tiny_model_dir, monkeypatch, 3, 1,
                                  "--limit", "1", "--steps", "2", "--out", str(out),
                                  "--work", str(tmp_path / "work"), "--shape", "down_proj:1:2",
                                  "--shape", "down_proj:2:4")
    rows = json.loads(out.read_text())
    assert [(r["layers"], r["rank"]) for r in rows] == [(1, 2), (2, 4)]
    assert all(set(r["contains_percent"]) == set(r["gold_span_nll"]) == set(study_shapes.SETTINGS)
               and r["questions"] > 0 for r in rows)
    assert rows[1]["bytes_per_atom"] > rows[0]["bytes_per_atom"] > 0  # more layers x rank: more bytes
    assert out.with_suffix(".png").stat().st_size > 0


def test_refusal_benchmark_calibrates_each_document_as_the_compiler_does(tmp_path, tiny_model_dir, monkeypatch):
    """benchmarks/study_refusal.py on a tiny model: every question scored against its document's calibrated
    threshold, off-topic probes refused far more often than answerable questions, JSON keyed by set."""
    out = tmp_path / "refusal.json"
    _run_benchmark("study_refusal", tmp_path, tiny_model_dir, monkeypatch, 4, 2, "--out", str(out))
    (result,) = json.loads(out.read_text()).values()
    assert result["questions"]["answerable"] > 0 and result["questions"]["off_topic"] > 0
    refused = result["refused_percent"]
    assert refused["off_topic"] > refused["answerable"] and 0 <= result["off_topic_refusal_f1"] <= 100


@portable
def test_fit_steps_follow_the_examples_when_passes_are_set():
    assert fit_steps(FitConfig(steps=60), 10) == fit_steps(FitConfig(steps=60), 500) == 60
    passes = FitConfig(passes=16, batch_size=12)
    assert (fit_steps(passes, 30), fit_steps(passes, 120), fit_steps(passes, 0)) == (40, 160, 1)


@portable
def test_length_batches_cover_every_example_once_per_pass_in_batches_of_like_length():
    import random

    lengths = [random.Random(i).randint(5, 120) for i in range(50)]
    batches = length_batches(lengths, batch_size=6, rng=random.Random(0), window=4)
    one_pass = []
    while sum(map(len, one_pass)) < len(lengths):
        one_pass.append(next(batches))
    assert sorted(r for b in one_pass for r in b) == list(range(50))  # a pass: each example exactly once
    assert all(4 <= len(b) <= 6 for b in one_pass)  # near-equal cuts, no tiny leftover batch
    spread = sum(max(lengths[r] for r in b) - min(lengths[r] for r in b) for b in one_pass) / len(one_pass)
    assert spread < 0.5 * (max(lengths) - min(lengths))  # sorted windows: little padding per batch
