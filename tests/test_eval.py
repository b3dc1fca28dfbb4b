"""`doc2atom eval`: the metrics, and the whole harness on a tiny model through both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from training.data.build import BuildConfig, build_dataset
from training.evaluate.harness import summarize
from training.evaluate.scoring import (
    best_over,
    contains,
    exact_match,
    looks_like_refusal,
    normalize_answer,
    token_f1,
)
from training.thresholds import refusal_scores
from vllm_doc2atom.settings import DEFAULT_REFUSAL

TINY = dict(adapted_layers=2, micro_rank=2, encoder_layer=1, hidden=64, slot_dim=8, batch_size=4)


def test_squad_normalisation_f1_em_and_containment():
    assert normalize_answer("The  Amber-Needle, lighthouse!") == "amberneedle lighthouse"
    assert exact_match("the Amber Needle.", "Amber Needle") == 1.0
    assert token_f1("in 1848", "1848") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert token_f1("Dr. Lena Vorvak", "Lena Okafor") == pytest.approx(0.4)  # 1 of 3 / 1 of 2
    assert token_f1("", "x") == 0.0 and token_f1("the", "a") == 1.0  # both empty after normalisation
    assert contains("It was built in 1848 by Tor.", "1848") == 1.0
    assert contains("It was built in 18481.", "1848") == 0.0  # whole tokens only
    assert best_over(token_f1, "Vorvak", ["Okafor", "Lena Vorvak"]) == pytest.approx(2 / 3)


def test_refusals_are_recognised_and_scored_as_the_positive_class():
    assert looks_like_refusal(DEFAULT_REFUSAL)
    assert looks_like_refusal("The document does not mention the comet.")
    assert not looks_like_refusal("The comet is called Velquil.")
    scores = refusal_scores([(True, True), (True, False), (False, True), (False, False), (False, False)])
    assert (scores.precision, scores.recall, scores.f1) == (0.5, 0.5, 0.5)
    assert scores.should_refuse == 2 and scores.refused == 2
    assert refusal_scores([(False, False)]).f1 == 0.0


def test_summary_scores_off_topic_probes_apart_from_unanswerable_questions():
    def row(kind: str, refused: bool) -> dict:
        scores = {"f1": 0.0, "em": 0.0, "contains": 1.0} if kind == "answerable" else {}
        return {"kind": kind, "refused": refused, "flagged_refusal": refused, "seconds": 1.0, **scores}

    rows = [row("answerable", False), row("answerable", True), row("off_topic", True), row("off_topic", True),
            row("unanswerable", False), row("unanswerable", False)]
    summary = summarize(rows)
    assert summary["refusal_f1"] == 57.14  # P 2/3, R 2/4: the on-topic unanswerable questions count as misses
    assert summary["off_topic_refusal_f1"] == 80.0  # P 2/3, R 2/2
    assert summary["answerable_refused"] == 50.0


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_model_dir):
    """A tiny dataset and a doc2atom and a d2l_atom checkpoint trained on it for a few steps."""
    from training.cli import main

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    build_dataset(BuildConfig(source="synthetic", out=data, limit=4, teacher_model=str(tiny_model_dir),
                              teacher_backend="transformers", top_k=4, probes_per_document=2))
    checkpoints = {}
    for method in ("doc2atom", "d2l_atom"):
        config = root / f"{method}.yaml"
        config.write_text(yaml.safe_dump({"data": str(data), "model": str(tiny_model_dir), "out": str(root / method),
                                          "method": method, "steps": 2, "eval_every": 2, **TINY}))
        assert main(["train", "--config", str(config)]) == 0
        checkpoints[method] = str(root / method / "checkpoint")
    return data, checkpoints


def _run(tmp_path, eval_setup, backend, methods):
    from training.cli import main

    data, checkpoints = eval_setup
    out = tmp_path / backend
    argv = ["eval", "--data", str(data), "--out", str(out), "--checkpoint", checkpoints["doc2atom"],
            "--d2l-atom-checkpoint", checkpoints["d2l_atom"], "--methods", methods, "--backend", backend,
            "--split", "train", "--limit", "2", "--max-tokens", "6", "--serve-args", "--dtype float32 --max-num-seqs 8"]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_eval_in_process_scores_every_method_and_writes_table_json_and_chart(tmp_path, eval_setup, capsys):
    out, results = _run(tmp_path, eval_setup, "transformers", "base,icl,d2l_raw,d2l_atom,doc2atom")
    table = capsys.readouterr().out
    assert list(results["methods"]) == ["base", "icl", "d2l_atom", "doc2atom"]
    assert results["skipped"] == {"d2l_raw": "no checkpoint given"} and "d2l_raw not run" in table
    assert results["settings"]["device"] == "auto" and results["device"]["dtype"] in ("float32", "bfloat16")
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    questions = {r["question_id"] for r in replies}
    assert len(replies) == 4 * len(questions)
    kinds = {r["kind"] for r in replies}
    assert kinds == {"answerable", "off_topic"}
    for method, entry in results["methods"].items():
        overall = entry["overall"]
        assert overall["questions"] == len(questions) and overall["should_refuse"] == 4  # 2 docs x 2 probes
        assert 0 <= overall["f1"] <= 100 and overall["em"] <= overall["f1"] + 1e-9
        assert f"| {method} | synthetic |" in table
    # Costs: monolithic adapters and banks both measured, per document.
    for method in ("d2l_atom", "doc2atom"):
        costs = results["methods"][method]
        assert costs["documents"] == 2 and costs["bytes_per_document"] > 0 and costs["compile_peak_memory_mb"] > 0
        assert costs["device"] == results["device"]["device"]  # compiled where the answers ran
    assert len(list((out / "banks" / "doc2atom").iterdir())) == 2
    assert len(list((out / "adapters" / "d2l_atom").iterdir())) == 2
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Routed answers are really composed: a non-refused doc2atom reply used atoms.
    routed = [r for r in replies if r["method"] == "doc2atom" and not r["flagged_refusal"]]
    assert all(r["atoms"] > 0 for r in routed)
    # The gold answer's NLL: for every answerable question a method did not refuse, averaged in the summary.
    for method, entry in results["methods"].items():
        nll = [r["gold_nll"] for r in replies if r["method"] == method and r["kind"] == "answerable"
               and not r["flagged_refusal"]]
        assert nll and all(0 < x < 30 for x in nll)
        assert entry["overall"]["gold_nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-3)
    assert "| gold NLL |" in table


def test_eval_served_path_matches_in_process_answers(tmp_path, eval_setup):
    """The same methods through a real `vllm serve --plugin doc2atom`: same routing and same greedy answers
    as transformers+PEFT (fp32 on both sides)."""
    methods = "base,d2l_atom,doc2atom"
    _, served = _run(tmp_path, eval_setup, "served", methods)
    _, local = _run(tmp_path, eval_setup, "transformers", methods)
    load = lambda b: {(r["method"], r["question_id"]): r for r in  # noqa: E731
                      map(json.loads, (tmp_path / b / "replies.jsonl").read_text().splitlines())}
    served_rows, local_rows = load("served"), load("transformers")
    assert served_rows.keys() == local_rows.keys()
    for key, row in served_rows.items():
        assert row["flagged_refusal"] == local_rows[key]["flagged_refusal"], key
        assert row["atoms"] == local_rows[key]["atoms"], key
    same = sum(row["reply"] == local_rows[key]["reply"] for key, row in served_rows.items())
    assert same >= 0.9 * len(served_rows)  # greedy near-ties may flip a token on different kernels
    # the gold answer's NLL is scored in process after either backend: the same numbers
    scored = [(row["gold_nll"], local_rows[key]["gold_nll"]) for key, row in served_rows.items()
              if row.get("gold_nll") is not None]
    assert scored and all(abs(a - b) < 1e-4 for a, b in scored), scored


def test_answer_tail_counts_the_tokens_that_spell_the_answer():
    from training.evaluate.backends import answer_tail

    assert answer_tail(["<|im_start|>", "assistant", "\n", "17", "87"], "1787") == 2
    assert answer_tail(["user", ":", " Mount", " Ke", "lder"], " Mount Kelder ") == 3
    with pytest.raises(ValueError, match="does not end with"):
        answer_tail(["a", "b"], "zebra")


def test_recipes_carry_the_compile_settings_of_each_method():
    from training.evaluate.harness import EvalConfig, recipes_for

    config = EvalConfig(data=[], checkpoint="ckpt", methods=["icl", "doc2atom", "doc2atom_optimize", "d2l_atom",
                                                             "doc2atom_study", "d2l_study", "doc2atom_evidence",
                                                             "doc2atom_text"],
                        refine_steps=3, refine_lr=0.01)
    recipes, skipped = recipes_for(config, Path("models/base"))
    assert skipped == {"d2l_atom": "no checkpoint given"}
    assert set(recipes) == {"doc2atom", "doc2atom_optimize", "doc2atom_study", "d2l_study", "doc2atom_evidence",
                            "doc2atom_text"}
    study, monolithic = recipes["doc2atom_study"], recipes["d2l_study"]  # self-study needs no checkpoint
    assert (study.mode, study.checkpoint, study.model, study.monolithic) == ("study", None, "models/base", False)
    assert recipes["doc2atom_evidence"] == recipes["doc2atom_text"] == study  # same banks, served with the text
    assert monolithic.monolithic and monolithic.mode == "study"
    optimize = recipes["doc2atom_optimize"]
    assert (optimize.mode, optimize.refine_steps, optimize.refine_lr) == ("optimize", 3, 0.01)
    assert recipes["doc2atom"].mode == "amortized"
