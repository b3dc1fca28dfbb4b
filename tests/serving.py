"""The test flavour of a real `vllm serve ... --plugin doc2atom`: fp32 (for exact comparisons), short context."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from training.serve_process import vllm_server as _vllm_server


@contextlib.contextmanager
def vllm_server(model: Path, bank_root: Path, log: Path, *extra: str) -> Iterator[str]:
    args = ["--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-num-seqs", "16", *extra]
    with _vllm_server(model, bank_root, log, args, max_model_len=512) as url:
        yield url
