"""Reading a trained memory compiler checkpoint (safetensors + JSON). Compiling needs only this, not the trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from .model import CompilerConfig, MemoryCompiler

CHECKPOINT_VERSION = 2  # 2: the compiler reads atom tokens (slots); 1 read pooled features and cannot be loaded


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """checkpoint.json, refused with a clear message when its format version is not this code's."""
    meta = json.loads((path / "checkpoint.json").read_text())
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {meta.get('format_version')}, this doc2atom reads "
                         f"version {CHECKPOINT_VERSION} (a different compiler architecture): retrain it with "
                         "`doc2atom train`, or use the shipped checkpoint")
    return meta


def load_compiler(path: str | Path) -> tuple[MemoryCompiler, dict[str, Any]]:
    """A trained compiler and its checkpoint metadata."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    compiler = MemoryCompiler(CompilerConfig(**meta["compiler"]))
    tensors = load_file(str(path / "compiler.safetensors"))
    compiler.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return compiler.eval(), meta
