"""The plugin's parts that need no server: flag expansion, settings, bank names, the adapter LRU."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from vllm_doc2atom.adapter_registry import AdapterRegistry, AdapterRejected
from vllm_doc2atom.bank_store import BankStore
from vllm_doc2atom.cli_args import LORA_DEFAULTS, MIDDLEWARE, add_arguments, expand
from vllm_doc2atom.composer import compose
from vllm_doc2atom.errors import BankError
from vllm_doc2atom.openai_io import RequestError, extract_question
from vllm_doc2atom.settings import ServeSettings


def _parse(argv: list[str]) -> argparse.Namespace:
    from vllm.utils.argparse_utils import FlexibleArgumentParser  # accepts --a_b for --a-b, as vllm serve does

    parser = FlexibleArgumentParser()
    parser.add_argument("--middleware", action="append", default=[])
    parser.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument("--max-cpu-loras", type=int, default=None)
    add_arguments(parser)
    add_arguments(parser)  # idempotent
    namespace = parser.parse_args(argv)
    expand(namespace, argv)
    return namespace


def test_plugin_flag_expands_into_vllm_options_without_overriding_the_user():
    plain = _parse([])
    assert plain.middleware == [] and plain.enable_lora is None and plain.max_lora_rank == 16
    on = _parse(["--plugin", "doc2atom"])
    assert on.middleware == [MIDDLEWARE]
    assert {k: getattr(on, k) for k in LORA_DEFAULTS} == LORA_DEFAULTS
    user = _parse(["--plugin", "doc2atom", "--max-lora-rank=16", "--max_loras", "2"])
    assert user.max_lora_rank == 16 and user.max_loras == 2 and user.max_cpu_loras == LORA_DEFAULTS["max_cpu_loras"]
    with pytest.raises(SystemExit, match="needs LoRA"):
        _parse(["--plugin", "doc2atom", "--no-enable-lora"])
    with pytest.raises(SystemExit, match="unknown --plugin 'other'"):
        _parse(["--plugin", "other"])


def test_settings_from_args(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    args = _parse(["--plugin", "doc2atom", "--doc2atom-bank-root", "~/banks", "--doc2atom-threshold", "0.7"])
    args.api_key, args.api_server_count = ["k1"], 2
    settings = ServeSettings.from_args(args)
    assert settings.bank_root == Path("~/banks").expanduser() and settings.threshold == 0.7
    assert settings.api_keys == ("k1",) and settings.shared_engine and settings.max_lora_rank == 64
    assert settings.adapter_dir.name == str(os.getpid())
    assert settings.evidence == "off"
    for argv, mode in ((["--doc2atom-evidence"], "with-adapter"), (["--doc2atom-evidence", "only"], "only")):
        assert ServeSettings.from_args(_parse(["--plugin", "doc2atom", *argv])).evidence == mode
    with pytest.raises(SystemExit):
        _parse(["--plugin", "doc2atom", "--doc2atom-evidence", "sometimes"])


def test_bank_names_are_confined_to_the_root(tmp_path_factory, bank):
    root = bank.path.parent
    os.symlink(tmp_path_factory.mktemp("outside"), root / "link-out")
    store = BankStore(root)
    assert store.get("bank") is store.get("bank")  # cached
    for name, kind in [("../bank", "bad_request"), ("/bank", "bad_request"), ("a//b", "bad_request"),
                       ("link-out", "bad_request"), ("", "bad_request"), (None, "bad_request"),
                       ("missing", "not_found")]:
        with pytest.raises(BankError) as err:
            store.get(name)
        assert err.value.kind == kind, name
    assert [b["id"] for b in store.list()] == ["bank"]


def test_question_extraction():
    chat = {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                         {"role": "user", "content": [{"type": "text", "text": "second"}]}]}
    assert extract_question("chat", chat) == "second"
    assert extract_question("completion", {"prompt": ["only one"]}) == "only one"
    with pytest.raises(RequestError, match="token ids"):
        extract_question("completion", {"prompt": [[1, 2]]})


def test_evidence_goes_before_the_routed_question_without_touching_the_request():
    from vllm_doc2atom.openai_io import with_evidence

    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text",
                                                                                       "text": "Who?"}]}]}
    rewritten = with_evidence("chat", chat, ["Ada wrote it.", "In 1901."])
    parts = rewritten["messages"][1]["content"]
    assert parts[0]["text"] == "Document:\nAda wrote it.\nIn 1901.\n\nQuestion: " and parts[1]["text"] == "Who?"
    assert chat["messages"][1]["content"] == [{"type": "text", "text": "Who?"}]  # the original is untouched
    completion = with_evidence("completion", {"prompt": ["Who?"]}, ["Ada wrote it."])
    assert completion["prompt"].startswith("Document:\nAda") and completion["prompt"].endswith("it.\n\nWho?")


def test_hostile_json_is_not_parsed():
    from vllm_doc2atom.asgi import parse_json

    assert parse_json(b"[" * 100_000) is None and parse_json(b'{"a": ' + b"[" * 10_000) is None
    assert parse_json(b'{"a": [[1]], "b": "[[[["}') == {"a": [[1]], "b": "[[[["}
    assert parse_json(b"not json") is None


def test_adapter_folders_of_dead_processes_are_swept(tmp_path):
    from vllm_doc2atom.adapter_registry import claim_adapter_dir

    own, alive, dead = tmp_path / str(os.getpid()), tmp_path / "1", tmp_path / "999999999"
    for folder in (own, alive, dead):
        (folder / "d2a-x").mkdir(parents=True)
    claim_adapter_dir(own)
    assert own.exists() and alive.exists() and not dead.exists()  # pid 1 lives; no pid is that high


class _Engine:
    """Stands in for vLLM's EngineClient LoRA calls; the real engine is exercised in test_serve.py."""

    def __init__(self, refuse: bool = False, remove_delay: float = 0.0) -> None:
        self.loaded: set[int] = set()
        self.refuse = refuse
        self.remove_delay = remove_delay

    async def add_lora(self, request) -> bool:
        if self.refuse:
            raise ValueError("LoRA rank 64 is greater than max_lora_rank 8")
        self.loaded.add(request.lora_int_id)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        await asyncio.sleep(self.remove_delay)
        self.loaded.discard(lora_id)
        return True


def test_adapter_registry_counts_references_and_evicts_lru(tmp_path, bank):
    class Models:
        lora_requests: dict = {}

    engine, models = _Engine(), Models()
    registry = AdapterRegistry(tmp_path / "adapters", capacity=1, engine_client=engine, serving_models=models)
    first, second = compose(bank, [(0, 0.5)]), compose(bank, [(1, 0.5)])

    async def scenario():
        _, hit = await registry.acquire(first.name, first.int_id, lambda: first)
        assert not hit
        _, hit = await registry.acquire(first.name, first.int_id, lambda: first)
        assert hit
        await registry.acquire(second.name, second.int_id, lambda: second)
        assert len(registry) == 2  # over capacity, but both are in use
        await registry.release(first.name)
        assert len(registry) == 2  # first still has one user
        await registry.release(first.name)
        assert set(models.lora_requests) == {second.name} and engine.loaded == {second.int_id}
        assert [p.name for p in (tmp_path / "adapters").iterdir()] == [second.name]

        rejecting = AdapterRegistry(tmp_path / "rejected", 4, _Engine(refuse=True), models)
        with pytest.raises(AdapterRejected, match="greater than max_lora_rank"):
            await rejecting.acquire(first.name, first.int_id, lambda: first)
        assert len(rejecting) == 0 and list((tmp_path / "rejected").iterdir()) == []

    asyncio.run(scenario())


def test_adapter_registered_again_while_being_evicted_survives(tmp_path, bank):
    class Models:
        lora_requests: dict = {}

    engine = _Engine(remove_delay=0.05)  # a slow engine: the eviction is still running when `first` comes back
    registry = AdapterRegistry(tmp_path, capacity=1, engine_client=engine, serving_models=Models())
    first, second = compose(bank, [(0, 0.5)]), compose(bank, [(1, 0.5)])

    async def scenario():
        await registry.acquire(first.name, first.int_id, lambda: first)
        await registry.release(first.name)
        evicting = asyncio.create_task(registry.acquire(second.name, second.int_id, lambda: second))
        await asyncio.sleep(0.01)
        _, hit = await registry.acquire(first.name, first.int_id, lambda: first)
        await evicting
        assert not hit and first.int_id in engine.loaded
        assert (tmp_path / first.name / "adapter_model.safetensors").is_file()

    asyncio.run(scenario())
