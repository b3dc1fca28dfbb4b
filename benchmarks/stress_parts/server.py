"""The `vllm serve` side: its command-line flags, its composed-adapter folders, tracebacks in its log."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from .common import ADAPTER_CACHE, API_KEY


def server_args(adapter_dir: Path) -> list[str]:
    return ["--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-num-seqs", "16",
            "--api-key", API_KEY, "--doc2atom-adapter-dir", str(adapter_dir),
            "--doc2atom-adapter-cache", str(ADAPTER_CACHE)]


def count_adapter_folders(adapter_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(adapter_dir)) for p in adapter_dir.glob("*/d2a-*"))


async def settled_folders(adapter_dir: Path, limit: int, wait_s: float = 20.0) -> tuple[list[str], float]:
    """Folders once nothing is in flight: the last releases may land just after the client has its answer."""
    start = time.perf_counter()
    while True:
        folders = count_adapter_folders(adapter_dir)
        waited = time.perf_counter() - start
        if len(folders) <= limit or waited > wait_s:
            return folders, round(waited, 2)
        await asyncio.sleep(0.5)


def log_errors(log: Path, limit: int = 5) -> dict[str, Any]:
    """Tracebacks in the server log (the plugin logs every 500 with logger.exception)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    excerpts = ["\n".join(lines[max(0, i - 1):i + 25])[-1500:] for i in starts[:limit]]
    return {"tracebacks": len(starts), "excerpts": excerpts}
