"""The README's main job, `doc2atom demo`, end to end: self-study compiles examples/docs, a real
`vllm serve --plugin doc2atom` answers the in-scope questions from the bank and refuses the off-topic ones;
and the shipped amortized checkpoint is what its card says."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from training.amortized.shipped import shipped_checkpoint
from training.models import DEFAULT_MODEL


def test_shipped_checkpoint_is_small_inference_only_and_for_the_default_model():
    path = shipped_checkpoint()
    meta = json.loads((path / "checkpoint.json").read_text())
    assert meta["train"]["model"] == DEFAULT_MODEL and meta["optimizer_steps"] == {}
    assert meta["router_calibration"]["split"] == "validation"  # refusal threshold chosen on held-out documents
    assert (path / "compiler.safetensors").stat().st_size < 40 * 2**20
    assert "## Evaluation" in (path / "CARD.md").read_text()
    with pytest.raises(ValueError, match="no shipped checkpoint for 'other-model'.*smollm2-135m-instruct"):
        shipped_checkpoint("other-model")


def test_demo_answers_from_the_bank_with_sources_refuses_off_topic_and_cleans_up(capsys):
    from training.cli import main
    from training.demo import QUESTIONS

    before = set(Path(tempfile.gettempdir()).glob("doc2atom-demo-*"))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nQ: ") == len(QUESTIONS)
    assert out.count("refused, as it should") == sum(expected is None for _, expected in QUESTIONS)
    assert "answered an off-topic question" not in out
    # In-scope questions are answered with an adapter composed from atoms of the right document.
    composed = re.findall(r"composed (\d+) atoms into a rank-(\d+) LoRA", out)
    assert len(composed) == sum(expected is not None for _, expected in QUESTIONS)
    # ... and again with the routed atoms' text (atom_evidence), each with a verdict, then a summary
    assert len(re.findall(r"atom_evidence='only': (?:right|wrong)\)", out)) == len(composed)
    assert re.search(r"facts right: \d of 4 from the adapter alone, \d of 4 with atom_evidence='only'", out)
    assert "- w=" in out and " rerank " in out and "server stopped" in out  # routed with the shipped reranker
    assert set(Path(tempfile.gettempdir()).glob("doc2atom-demo-*")) == before  # nothing left behind
