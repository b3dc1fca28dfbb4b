"""The test flavour of a real `vllm serve ... --plugin doc2atom` (fp32 for exact comparisons, short context), and
the one such server the serving tests share (session fixtures, registered in conftest.py), with its banks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import openai

# httpx, openai and vLLM are imported where they are used: a machine without them (scripts/gpu_check.sh's GPU
# machine) still runs the tests that need no server, and the server's fixtures skip.
EXAMPLE_DOCS = Path(__file__).resolve().parent.parent / "examples" / "docs"


@contextlib.contextmanager
def vllm_server(model: Path, bank_root: Path, log: Path, *extra: str) -> Iterator[str]:
    from training.serve_process import vllm_server as _vllm_server

    args = ["--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-num-seqs", "16", *extra]
    with _vllm_server(model, bank_root, log, args, max_model_len=512) as url:
        yield url


API_KEY = "test-key"
IN_SCOPE = {
    "How tall is the Amber Needle lighthouse?": "harbor_of_quillon",
    "Who wrote the Velmora Orchard Protocol?": "velmora_orchard_protocol",
    "Which comet did astronomers at Brightwater discover?": "brightwater_observatory",
}
OFF_TOPIC = "What is the best way to cook risotto?"
POOL = ["docs", "team/b1", "team/b2", "team/b3"]


@pytest.fixture(scope="session")
def bank_root(tmp_path_factory, tiny_model_dir, encoder) -> Path:
    from training.models import build_tiny_model

    from .untrained_bank import build_untrained_bank, default_spec

    root = tmp_path_factory.mktemp("bank-root")
    documents = {p.stem: p.read_text() for p in EXAMPLE_DOCS.glob("*.md")}
    spec = default_spec(tiny_model_dir, encoder, modules=("q_proj", "v_proj", "down_proj"), last_layers=2)
    # Large random factors: the composed adapter visibly changes the model (real factors come from training).
    for seed, name in enumerate(POOL + ["mutable"]):
        build_untrained_bank(root / name, spec, documents, encoder, seed=seed, scale=0.3)
    wide = default_spec(tiny_model_dir, encoder, last_layers=2, micro_rank=4)
    build_untrained_bank(root / "wide", wide, documents, encoder, scale=0.3)

    shutil.copytree(root / "docs", root / "corrupt")
    segment = next((root / "corrupt" / "segments").glob("*.safetensors"))  # keys and gates: found at load
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF
    segment.write_bytes(bytes(data))

    gemma = build_tiny_model(tmp_path_factory.mktemp("other") / "gemma", arch="gemma2")
    build_untrained_bank(root / "other-model", default_spec(gemma, encoder, last_layers=2), documents, encoder)

    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "docs", outside / "bank")
    os.symlink(outside / "bank", root / "escape")
    os.symlink("loop", root / "loop")  # a symlink loop
    # Banks the hostile tests damage while they are loaded (content of their own: adapters are shared by
    # banks of identical content), and ones that are wrong from the start.
    for seed, name in enumerate(("poison", "truncated", "deleted"), start=100):
        build_untrained_bank(root / name, spec, documents, encoder, seed=seed, scale=0.3)
    for name in (".hidden", "bad-head"):
        shutil.copytree(root / "docs", root / name)
    manifest = json.loads((root / "bad-head" / "manifest.json").read_text())
    manifest["spec"]["router_head"] = {"threshold": "abc"}
    (root / "bad-head" / "manifest.json").write_text(json.dumps(manifest))
    return root


def overwrite_factors(shard: Path, byte: int = 0xFF) -> None:
    """Overwrite a safetensors file's tensor bytes in place (same size, valid header): 0xFF makes them NaN."""
    with open(shard, "r+b") as f:
        header = struct.unpack("<Q", f.read(8))[0]
        size = shard.stat().st_size - 8 - header
        f.seek(8 + header)
        f.write(bytes([byte]) * size)


@pytest.fixture(scope="session")
def server(tiny_model_dir, bank_root, tmp_path_factory):
    pytest.importorskip("vllm", reason="the serving tests need vLLM")
    logs = tmp_path_factory.mktemp("logs")
    adapters = tmp_path_factory.mktemp("adapters")
    (adapters / "999999999" / "d2a-left-by-a-dead-process").mkdir(parents=True)  # pids never go this high
    with vllm_server(tiny_model_dir, bank_root, logs / "serve.log", "--api-key", API_KEY,
                     "--doc2atom-adapter-dir", str(adapters), "--doc2atom-adapter-cache", "2") as url:
        yield {"url": url, "adapters": adapters, "log": logs / "serve.log"}
    left = [p.name for p in adapters.glob("*/*")]
    assert not left, f"composed adapters left in the adapter dir after shutdown: {left}"


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model(client) -> str:
    return client.models.list().data[0].id


def ask(client, model, question, bank="docs", extra: dict | None = None, **kwargs):
    settings = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], extra_body={"atom_bank": bank, **(extra or {})},
        **settings)


def metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
