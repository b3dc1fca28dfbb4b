"""Where the base model runs and in which precision: `--device` and `--dtype` of compile, eval and data build.

    --device auto | cpu | cuda | cuda:N     auto: the GPU when torch sees one, else the CPU
    --dtype  auto | float32 | bfloat16      auto: bfloat16 on a GPU that supports it, else float32

One `DeviceConfig` is resolved from the flags (InputError naming the flag before any model loads) and handed
to every place that loads a base model, so CPU and CUDA run the same code. Only the base model takes the
dtype: micro-LoRA factors, optimizer state and the bank's tensors stay float32 on every device, so banks
compiled on a GPU and on a CPU are interchangeable. The default, `DeviceConfig()`, is the CPU in float32: what
every library caller got before these flags existed.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .inputs import InputError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


@dataclass(frozen=True)
class DeviceConfig:
    """A resolved placement: `device` is "cpu", "cuda" (torch's current GPU: under torchrun, the rank's
    own) or "cuda:N"; `dtype` is "float32" or "bfloat16"."""

    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def from_flags(cls, device: str = "auto", dtype: str = "auto") -> DeviceConfig:
        """Resolve and check --device / --dtype: InputError, naming the flag, for what this machine lacks."""
        device, dtype = device.strip().lower(), dtype.strip().lower()
        if dtype not in ("auto", *DTYPES):
            raise InputError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device != "cpu":
            _check_cuda(device)
        cuda = device != "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
        elif dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
            raise InputError(f"--dtype bfloat16: {torch.cuda.get_device_name(torch.device(device))} has no "
                             "bfloat16 support; use --dtype float32")
        return cls(device, dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_cuda(self) -> bool:
        return self.device != "cpu"

    def load_causal_lm(self, model_dir: str | Path) -> torch.nn.Module:
        """A frozen base model in eval mode, in this dtype, on this device."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.torch_dtype)
        logger.info("base model %s on %s in %s", Path(model_dir).name, self.device, self.dtype)
        return model.to(self.torch_device).eval().requires_grad_(False)

    def rows_that_fit(self, cpu_rows: int, bytes_per_row: float, max_rows: int = 512,
                      share: float = 0.5) -> int:
        """How many rows (prompts, examples) to run at once. CPU: `cpu_rows`, the tested default. CUDA: as
        many as `share` of the free GPU memory holds at `bytes_per_row`, between cpu_rows and max_rows
        (the batch size changes the speed, not what is computed: the GPU takes what fits)."""
        if not self.is_cuda:
            return cpu_rows
        free, _ = torch.cuda.mem_get_info(self.torch_device)
        return int(min(max_rows, max(cpu_rows, share * free // max(bytes_per_row, 1.0))))

    def describe(self) -> dict[str, str | float]:
        """For compile stats and eval results: the device (with the GPU's name and peak memory) and dtype."""
        info: dict[str, str | float] = {"device": self.device, "dtype": self.dtype}
        if self.is_cuda and torch.cuda.is_available():
            index = torch.cuda.current_device() if self.device == "cuda" else self.torch_device.index
            info |= {"device": f"cuda:{index}", "device_name": torch.cuda.get_device_name(index),
                     "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(index) / 2**20, 1)}
        return info


def _check_cuda(device: str) -> None:
    match = _CUDA.match(device)
    if match is None:
        raise InputError(f"--device {device}: choose {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise InputError(f"--device {device}: torch sees no CUDA GPU here ({build}); "
                         "use --device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (inputs go there)."""
    return next(model.parameters()).device


def add_device_flags(parser: argparse.ArgumentParser, what: str = "the base model") -> None:
    """--device and --dtype, explained the same way on every command."""
    parser.add_argument("--device", default="auto",
                        help=f"where {what} runs: auto (default: the GPU when torch sees one, else the CPU), "
                             "cpu, cuda (the current GPU) or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help=f"precision of {what}'s weights: auto (default: bfloat16 on a GPU that "
                             "supports it, else float32), float32 or bfloat16. Micro-LoRA factors are fitted "
                             "and stored in float32 either way")


def device_from_args(args: argparse.Namespace) -> DeviceConfig:
    return DeviceConfig.from_flags(args.device, args.dtype)
