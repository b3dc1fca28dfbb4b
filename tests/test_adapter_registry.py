"""The composed-adapter registry: reference counts, LRU eviction, the engine's refusals, stale folders."""

from __future__ import annotations

import asyncio
import os

import pytest

from vllm_doc2atom.adapter_registry import AdapterRegistry, AdapterRejected
from vllm_doc2atom.composer import compose


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
