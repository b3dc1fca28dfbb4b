"""The composer: routed atoms -> ONE query-specific LoRA, written in PEFT format for vLLM and PEFT.

For every target linear t, the atoms' updates add up:

    ΔW_t = Σ_i w_i · g_i[t] · s · B_i[t] A_i[t]        (w: router weight, g: gate, s: bank scaling)

which is exactly one LoRA of rank R = Σ r_i:

    A_t = stack_i(w_i · g_i[t] · s · A_i[t])   [R, in]      B_t = cat_i(B_i[t])   [out, R]

written with lora_alpha = r = R so PEFT's and vLLM's scaling (alpha / r) is 1. Weights are rounded
to WEIGHT_DECIMALS before composing, so the adapter is a pure function of (bank content, atoms,
rounded weights) and its name and integer id, content hashes of exactly that, are the same in
every process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BankError
from .files import atomic_directory
from .fingerprint import module_path

if TYPE_CHECKING:
    import torch

    from .bank_interface import RoutableBank

logger = logging.getLogger(__name__)

WEIGHT_DECIMALS = 3
COMPOSER_VERSION = 1  # bump when the composed tensors change for the same inputs
PEFT_PREFIX = "base_model.model."
FP16_MAX = 65504.0  # beyond this an fp16 engine overflows to inf (bf16 goes further, but no sane LoRA gets there)


@dataclass
class ComposedAdapter:
    name: str  # "d2a-<hash>": the LoRA name vLLM serves it under
    int_id: int  # positive integer id derived from the same hash
    rank: int
    used: list[tuple[int, float]]  # (bank row, rounded weight) composed, in canonical (row) order
    dropped: list[tuple[int, float]]  # routed but left out to respect the rank budget
    tensors: dict[str, torch.Tensor]  # PEFT safetensors keys -> tensors
    config: dict[str, Any]  # adapter_config.json


def fit_rank_budget(selection: Sequence[tuple[int, float]], micro_rank: int,
                    max_rank: int | None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Round weights, drop zero ones, keep the highest-weight atoms whose ranks fit in max_rank.

    Returns (used, dropped), `used` sorted by bank row so equal selections compose identically.
    """
    rounded = [(int(i), round(float(w), WEIGHT_DECIMALS)) for i, w in selection]
    rounded = [(i, w) for i, w in rounded if w > 0]
    if len({i for i, _ in rounded}) != len(rounded):
        raise ValueError("an atom appears twice in the selection")
    by_weight = sorted(rounded, key=lambda iw: (-iw[1], iw[0]))
    budget = len(by_weight) if max_rank is None else max_rank // micro_rank
    used, dropped = by_weight[:budget], by_weight[budget:]
    return sorted(used), dropped


def adapter_identity(bank_fingerprint: str, used: Sequence[tuple[int, float]]) -> tuple[str, int]:
    """(name, int_id) as content hashes of the bank content and the rounded selection."""
    text = f"v{COMPOSER_VERSION}|{bank_fingerprint}|" + ";".join(f"{i}:{w:.{WEIGHT_DECIMALS}f}" for i, w in used)
    digest = hashlib.sha256(text.encode()).hexdigest()
    # 48 bits: collision-free in practice, and exact in JSON numbers and int64 alike.
    return f"d2a-{digest[:24]}", int(digest[:12], 16) + 1


def stack_factors(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i scale_i · B_i A_i as one LoRA: a [..., k, r, in], b [..., k, out, r], scale [..., k]
    -> A [..., k·r, in], B [..., out, k·r]. Differentiable; the trainer composes with it too."""
    *batch, k, r, d_in = a.shape
    d_out = b.shape[-2]
    stacked_a = (scale[..., None, None] * a).reshape(*batch, k * r, d_in)
    stacked_b = b.transpose(-3, -2).reshape(*batch, d_out, k * r)
    return stacked_a, stacked_b


def compose(bank: RoutableBank, selection: Sequence[tuple[int, float]],
            max_rank: int | None = None) -> ComposedAdapter:
    """Compose routed atoms (bank row, router weight) into one PEFT LoRA of rank Σ r_i ≤ max_rank.

    Raises BankError kind "invalid" rather than return an adapter with a value that is not finite or
    overflows fp16: loaded into the engine, it would poison every request batched with it.
    """
    import torch

    spec = bank.spec
    used, dropped = fit_rank_budget(selection, spec.micro_rank, max_rank)
    if not used:
        raise ValueError("nothing to compose: no atom with a positive weight fits the rank budget")
    if dropped:
        logger.info("rank budget %s: composing %d atoms, dropping %d", max_rank, len(used), len(dropped))
    rows = [i for i, _ in used]
    weights = torch.tensor([w for _, w in used], dtype=torch.float32)  # [k]
    gates = torch.from_numpy(bank.gates[rows]).float()  # [k, T]
    factors = bank.factors(rows)
    rank = len(used) * spec.micro_rank

    tensors: dict[str, torch.Tensor] = {}
    for t_no, target in enumerate(spec.targets):
        a, b = factors[target]  # [k, r, in], [k, out, r]
        prefix = PEFT_PREFIX + module_path(target.module, target.layer)
        stacked_a, stacked_b = stack_factors(a, b, weights * gates[:, t_no] * spec.lora_scaling)
        tensors[f"{prefix}.lora_A.weight"] = stacked_a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = stacked_b.contiguous()
    if not all(_in_range(t) for t in tensors.values()):
        raise BankError(f"bank {bank.name!r}: composed adapter is not finite or exceeds the fp16 range; "
                        f"{_suspects(bank, rows, factors)} may be corrupt")

    name, int_id = adapter_identity(bank.fingerprint, used)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model.name,
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: the weights are folded into A
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        # Full module paths: PEFT matches them as suffixes, so only these exact layers get a LoRA.
        "target_modules": sorted({module_path(t.module, t.layer) for t in spec.targets}),
    }
    return ComposedAdapter(name=name, int_id=int_id, rank=rank, used=used, dropped=dropped,
                           tensors=tensors, config=config)


def _in_range(t: torch.Tensor) -> bool:
    return bool((t.abs() <= FP16_MAX).all())  # False for NaN and ±inf too


def _suspects(bank: RoutableBank, rows: list[int], factors: dict) -> str:
    """The shards of the atoms whose own factors are out of range (all used shards if none is alone)."""
    bad = [row for k, row in enumerate(rows) if not all(_in_range(x[k]) for ab in factors.values() for x in ab)]
    return ", ".join(sorted({bank.shard_label(row) for row in bad or rows}))


def save_peft_adapter(adapter: ComposedAdapter, root: str | os.PathLike) -> Path:
    """Write `root/<adapter.name>/` (adapter_config.json + adapter_model.safetensors) atomically.

    The folder is content-addressed: if it already exists it holds the same adapter and is reused.
    """
    from safetensors.torch import save_file

    root = Path(root)
    final = root / adapter.name
    if (final / "adapter_model.safetensors").is_file():
        return final
    with atomic_directory(final, keep_existing=True) as tmp:  # an identical writer may win the race: fine
        (tmp / "adapter_config.json").write_text(json.dumps(adapter.config, indent=1) + "\n")
        save_file(adapter.tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return final
