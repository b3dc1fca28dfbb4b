"""The environment that scripts/setup.sh leaves: vLLM's CLI, the plugin entry point, a light plugin import."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_vllm_cli_runs():
    version = importlib.metadata.version("vllm")
    out = subprocess.run([BIN / "vllm", "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == version


def test_vllm_serve_help_runs():
    out = subprocess.run([BIN / "vllm", "serve", "--help=enable-lora"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--enable-lora" in out.stdout


def test_transformers_llama_imports_without_broken_torchvision():
    code = "from transformers import LlamaForCausalLM, Gemma2ForCausalLM; import transformers.image_utils"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_plugin_entry_point_is_registered_and_idempotent():
    entry = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "doc2atom"]
    assert len(entry) == 1 and entry[0].value == "vllm_doc2atom:register"
    register = entry[0].load()
    register()
    register()


def test_plugin_import_is_light():
    """vLLM imports the plugin in every process: it must not drag torch, faiss or transformers in."""
    code = ("import sys, vllm_doc2atom; heavy = {'torch', 'faiss', 'transformers', 'sentence_transformers'} "
            "& set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_doc2atom_cli_help():
    out = subprocess.run([BIN / "doc2atom", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "models" in out.stdout and "bank" in out.stdout
