"""Bank mutations on disk during the run (swap, edit, corrupt), paced by the clients' progress."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .banks import BankFactory
from .common import BankNames, error_text


@dataclass
class Mutation:
    action: str
    bank: str
    after_requests: int = 0  # requests completed when it ran
    at_s: float = 0.0  # seconds since the run started
    detail: str = ""
    error: str | None = None


def overwrite_shard(shard: Path) -> None:
    """Tensor bytes overwritten in place with 0xFF (NaN), same size, valid safetensors header."""
    with open(shard, "r+b") as f:
        header = struct.unpack("<Q", f.read(8))[0]
        size = shard.stat().st_size - 8 - header
        f.seek(8 + header)
        f.write(b"\xff" * size)


class Progress:
    """Requests completed and mutations applied so far: the mutator waits for its milestones, and the clients
    wait for a mutation that falls behind (so that every mutation lands while requests are in flight)."""

    def __init__(self) -> None:
        self.done = 0
        self.mutations = 0
        self._changed = asyncio.Condition()

    async def step(self) -> None:
        async with self._changed:
            self.done += 1
            self._changed.notify_all()

    async def mutated(self) -> None:
        async with self._changed:
            self.mutations += 1
            self._changed.notify_all()

    async def wait_for(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.done >= count)

    async def wait_mutations(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.mutations >= count)


class Mutator:
    """Applies a fixed sequence of bank mutations, spread evenly over the run by requests completed."""

    def __init__(self, factory: BankFactory, names: BankNames, rng: random.Random) -> None:
        self.factory = factory
        self.rng = rng
        self.root = factory.root
        self.removed: list[str] = []
        swapped, edited, (nan, cut) = names.swapped, names.edited, names.corrupt
        self.plan = [Mutation("swap", swapped), Mutation("remove_document", edited),
                     Mutation("corrupt_overwrite", nan), Mutation("swap", swapped),
                     Mutation("add_document", edited), Mutation("corrupt_truncate", cut),
                     Mutation("swap", swapped), Mutation("remove_document", edited),
                     Mutation("corrupt_delete", cut), Mutation("add_document", edited)]

    def milestones(self, total: int) -> list[int]:
        """Requests completed before each mutation: evenly spread over the run."""
        return [total * step // (len(self.plan) + 1) for step in range(1, len(self.plan) + 1)]

    async def run(self, progress: Progress, total: int, started: float) -> list[Mutation]:
        for mutation, milestone in zip(self.plan, self.milestones(total), strict=True):
            await progress.wait_for(milestone)
            mutation.after_requests, mutation.at_s = progress.done, round(time.perf_counter() - started, 3)
            try:
                mutation.detail = await asyncio.to_thread(self.apply, mutation)
            except Exception as exc:  # a mutation that fails is reported, the run goes on
                mutation.error = error_text(exc)
            finally:
                await progress.mutated()
        return self.plan

    def apply(self, mutation: Mutation) -> str:
        from vllm_doc2atom.bank import AtomBank

        path = self.root / mutation.bank
        if mutation.action == "swap":
            seed = self.rng.randrange(1000, 10**6)
            self.factory.build(mutation.bank, seed)
            return f"rebuilt with seed {seed}"
        if mutation.action == "remove_document":
            bank = AtomBank.load(path)
            doc_id = self.rng.choice(bank.document_ids)
            bank.remove_documents([doc_id])
            self.removed.append(doc_id)
            return f"removed {doc_id}"
        if mutation.action == "add_document":
            doc_id = self.removed.pop()
            AtomBank.load(path).add_documents([self.factory.document(doc_id, self.rng.randrange(10**6))])
            return f"added {doc_id}"
        shard = self.rng.choice(sorted((path / "shards").glob("*.safetensors")))
        if mutation.action == "corrupt_overwrite":
            overwrite_shard(shard)
        elif mutation.action == "corrupt_truncate":
            shard.write_bytes(shard.read_bytes()[:100])
        elif mutation.action == "corrupt_delete":
            shard.unlink()
        else:
            raise ValueError(f"unknown mutation {mutation.action}")
        return f"{mutation.action.removeprefix('corrupt_')} {shard.name}"
