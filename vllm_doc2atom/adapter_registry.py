"""Composed adapters registered with the vLLM engine: an LRU with reference counts.

A folder is deleted, and the adapter removed from the engine, only when no request uses it and it
falls out of the LRU. The engine loads adapters from disk and may reload one after evicting it, so
the folder must outlive every request that names it. Names and ids are content hashes, so asking
for the same selection again reuses the registered adapter, and registering a name again waits
until an eviction of that name has finished (else the eviction would delete the new copy).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .composer import ComposedAdapter, save_peft_adapter
from .errors import Doc2AtomError

logger = logging.getLogger(__name__)


def claim_adapter_dir(own: Path) -> None:
    """Make `own` (<adapter dir>/<pid>) this process's: remove it at exit, and sweep the folders that dead
    API-server processes left beside it (a crash or SIGKILL skips their exit handler)."""
    atexit.register(shutil.rmtree, own, True)
    if not own.parent.is_dir():
        return
    for folder in own.parent.iterdir():
        if folder.name.isdigit() and folder != own and not _alive(int(folder.name)):
            logger.info("doc2atom: removing composed adapters left by dead process %s", folder.name)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class AdapterRejected(Doc2AtomError):
    """The engine refused a composed adapter (nothing is left registered)."""


@dataclass
class _Entry:
    request: Any  # vllm.lora.request.LoRARequest
    path: Path
    refs: int = 0


class AdapterRegistry:
    def __init__(self, root: Path, capacity: int, engine_client: Any, serving_models: Any,
                 remove_from_engine: bool = True) -> None:
        self.root = root
        self.capacity = capacity
        self._engine = engine_client
        self._serving_models = serving_models  # vLLM's model registry: lets the request name the adapter
        self._remove_from_engine = remove_from_engine  # off when several API servers share one engine
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._removals: dict[str, asyncio.Task] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def acquire(self, name: str, int_id: int, build: Callable[[], ComposedAdapter]) -> tuple[Any, bool]:
        """Registered LoRARequest for `name` (building and registering it on a miss), and whether it was a hit."""
        from vllm.lora.request import LoRARequest

        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self._entries.get(name)
            if entry is not None:
                entry.refs += 1
                self._entries.move_to_end(name)
                return entry.request, True
            if name in self._removals:
                await asyncio.shield(self._removals[name])
            path = await asyncio.to_thread(lambda: save_peft_adapter(build(), self.root))
            request = LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=str(path))
            try:
                await self._engine.add_lora(request)
            except Exception as exc:
                shutil.rmtree(path, ignore_errors=True)
                raise AdapterRejected(f"the engine refused the composed adapter: {exc}") from exc
            self._serving_models.lora_requests[name] = request
            self._entries[name] = _Entry(request, path, refs=1)
        await self._evict()
        return request, False

    async def release(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is not None:
            entry.refs -= 1
        await self._evict()

    async def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            name = next((n for n, e in self._entries.items() if e.refs <= 0), None)
            if name is None:
                return  # every adapter is in use: keep them all until released
            entry = self._entries.pop(name)
            self._locks.pop(name, None)
            self._serving_models.lora_requests.pop(name, None)
            # A task, shielded: a cancelled request (client gone) must not stop the removal halfway.
            self._removals[name] = asyncio.ensure_future(self._remove(name, entry))
            await asyncio.shield(self._removals[name])

    async def _remove(self, name: str, entry: _Entry) -> None:
        try:
            if self._remove_from_engine:
                try:
                    await self._engine.remove_lora(entry.request.lora_int_id)
                except Exception:  # the engine may have evicted it already
                    logger.debug("remove_lora(%s) failed", name, exc_info=True)
            await asyncio.to_thread(shutil.rmtree, entry.path, True)
            logger.debug("doc2atom: evicted adapter %s", name)
        finally:
            self._removals.pop(name, None)
