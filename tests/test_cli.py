"""The `doc2atom` CLI on real banks and models."""

from __future__ import annotations

import json

from training.cli import main


def test_bank_info_and_remove(bank, capsys):
    assert main(["bank", "info", str(bank.path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["atoms"] == 7 and summary["documents"] == 2 and summary["atoms_per_type"] == {"fact_claim": 7}
    assert main(["bank", "remove", str(bank.path), "doc-a"]) == 0
    assert "4 atoms in 1 documents remain" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["bank", "info", str(tmp_path / "missing")]) == 2
    assert "no atom bank there" in capsys.readouterr().err
    assert main(["models", "prepare", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["checkpoint", "calibrate", str(tmp_path), "--data", str(tmp_path / "no-data")]) == 2
    assert f"doc2atom checkpoint calibrate: error: checkpoint {tmp_path} has no checkpoint.json" in (
        capsys.readouterr().err)  # a message, not a traceback


def test_models_tiny_and_list(tmp_path, capsys):
    assert main(["models", "tiny", str(tmp_path / "tiny"), "--layers", "2"]) == 0
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
