"""Memory compiler checkpoints on disk (safetensors + JSON): read, written during training, exported to ship.
Compiling needs only the reader, not the trainer."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vllm_doc2atom.files import atomic_directory, make_readable

from ..inputs import checkpoint_folder, output_folder
from .config import TrainConfig
from .memory_compiler import CompilerConfig, MemoryCompiler

CHECKPOINT_VERSION = 2  # 2: the compiler reads atom tokens (slots); 1 read pooled features: cannot be loaded


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """checkpoint.json, refused with a clear message when its format version is not this code's."""
    meta = json.loads((checkpoint_folder(path) / "checkpoint.json").read_text())
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {meta.get('format_version')}, this doc2atom "
                         f"reads version {CHECKPOINT_VERSION} (a different compiler architecture): retrain it "
                         "with `doc2atom train`, or use the shipped checkpoint")
    return meta


def load_compiler(path: str | Path) -> tuple[MemoryCompiler, dict[str, Any]]:
    """A trained compiler and its checkpoint metadata."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    compiler = MemoryCompiler(CompilerConfig(**meta["compiler"]))
    tensors = load_file(str(path / "compiler.safetensors"))
    compiler.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return compiler.eval(), meta


def load_training_state(path: Path, compiler: MemoryCompiler, optimizer: torch.optim.Optimizer) -> int:
    """Resume: the compiler's weights and the optimizer's moments from a training checkpoint; its step."""
    loaded, meta = load_compiler(path)
    compiler.load_state_dict(loaded.state_dict())
    tensors = load_file(str(path / "compiler.safetensors"))
    for name, p in compiler.named_parameters():
        if f"optim.{name}.exp_avg" in tensors:
            optimizer.state[p] = {"step": torch.tensor(meta["optimizer_steps"][name]),
                                  "exp_avg": tensors[f"optim.{name}.exp_avg"],
                                  "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"]}
    return int(meta["step"])


def save_checkpoint(path: Path, compiler: MemoryCompiler, optimizer: torch.optim.Optimizer, step: int,
                    config: TrainConfig) -> None:
    """safetensors (weights, optimizer moments) + JSON (configs, step), swapped in atomically."""
    tensors = {f"model.{name}": p.detach().contiguous() for name, p in compiler.state_dict().items()}
    names = {id(p): name for name, p in compiler.named_parameters()}
    optim_steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                tensors[f"optim.{names[id(p)]}.exp_avg"] = state["exp_avg"].contiguous()
                tensors[f"optim.{names[id(p)]}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
                optim_steps[names[id(p)]] = float(state["step"])
    meta = {"format": "doc2atom-checkpoint", "format_version": CHECKPOINT_VERSION, "step": step,
            "compiler": compiler.config.to_dict(), "train": _jsonable(asdict(config)),
            "encoder_layer": config.encoder_layer, "optimizer_steps": optim_steps}
    _write(path, tensors, meta)


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """An inference-only copy (weights + configs, no optimizer moments: a third of the size) for shipping."""
    source, out = Path(source), Path(out)
    meta = json.loads((checkpoint_folder(source) / "checkpoint.json").read_text())
    output_folder(out)
    tensors = load_file(str(source / "compiler.safetensors"))
    tensors = {k: v for k, v in tensors.items() if k.startswith("model.")}
    # Shipped files must not name the trainer's machine: keep only the folder names of data and out.
    train = {**meta["train"], "data": Path(meta["train"]["data"]).name, "out": Path(meta["train"]["out"]).name}
    meta = {**meta, "train": train, "optimizer_steps": {},
            "exported_from": f"{source.resolve().parent.name}@step{meta['step']}"}
    _write(out, tensors, meta, keep_other_files=True)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
           keep_other_files: bool = False) -> None:
    """The checkpoint folder `path`, replaced in one swap; with `keep_other_files`, files already there that a
    checkpoint does not hold (a card) are carried over."""
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "compiler.safetensors"))
        make_readable(tmp / "compiler.safetensors")
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
        for extra in path.glob("*") if keep_other_files and path.exists() else []:
            if not (tmp / extra.name).exists():
                shutil.copy2(extra, tmp / extra.name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
