"""Run `vllm serve MODEL --plugin doc2atom` as a child process on loopback: for the demo, benchmarks, tests."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: str | Path, bank_root: str | Path, log: str | Path, extra_args: Sequence[str] = (),
                timeout: float = 300, max_model_len: int = 2048) -> Iterator[str]:
    """Start the server, yield its base URL once /health answers, and always stop its whole process group."""
    port = free_port()
    vllm = Path(sys.executable).parent / "vllm"
    command = [str(vllm), "serve", str(model), "--plugin", "doc2atom", "--doc2atom-bank-root", str(bank_root),
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
               "--gpu-memory-utilization", "0.2", *extra_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU: plenty for small models
    log = Path(log)
    logger.info("starting: %s (log: %s)", " ".join(command), log)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
