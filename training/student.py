"""The frozen base model as a student: per-sample LoRAs applied by forward hooks; its last N layers run alone.

Gradients only need the adapted (last N) layers, so the hidden states entering layer L-N can be computed once
and cached; a training step runs N layers + the LM head. Each sample of a batch carries its own composed LoRA,
applied by forward hooks on the target linears:
    y = W x + B_b (A_b x)       A_b [R, in], B_b [out, R] (stacked by vllm_doc2atom.composer.stack_factors)
which is what PEFT and vLLM compute for the same adapter. Self-study and the amortized trainer both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from vllm_doc2atom.bank_interface import Target
from vllm_doc2atom.fingerprint import module_path


class LoRAHooks:
    """Per-sample LoRA on the target linears of a frozen model; inactive while `factors` is None."""

    def __init__(self, model: nn.Module, targets: Sequence[Target]) -> None:
        # A [b, R, in], B [b, out, R] per target while active
        self.factors: dict[Target, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles = [model.get_submodule(module_path(t.module, t.layer))
                         .register_forward_hook(self._hook(t)) for t in targets]

    def _hook(self, target: Target):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self.factors is None or target not in self.factors:
                return output
            a, b = self.factors[target]
            # the factors are float32 master weights even when the base model runs in bfloat16: the LoRA
            # path runs in theirs and only its sum is cast to the layer's (no-ops for a float32 model)
            delta = (inputs[0].to(a.dtype) @ a.transpose(-1, -2)) @ b.transpose(-1, -2)
            return output + delta.to(output.dtype)

        return hook

    @contextmanager
    def active(self, factors: dict[Target, tuple[torch.Tensor, torch.Tensor]] | None):
        previous, self.factors = self.factors, factors
        try:
            yield
        finally:
            self.factors = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def run_last_layers(model: nn.Module, hidden: torch.Tensor, start_layer: int) -> torch.Tensor:
    """hidden [b, t, H] entering layer `start_layer` -> final-normed hidden states [b, t, H].

    Sequences are right-padded, so the causal mask alone keeps real positions exact. The states run in the
    model's dtype (cached states may be kept in another)."""
    inner = model.model
    hidden = hidden.to(inner.norm.weight.dtype)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
    rotary = inner.rotary_emb(hidden, positions)
    for layer in inner.layers[start_layer:]:
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        hidden = out[0] if isinstance(out, tuple) else out
    return inner.norm(hidden)


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states [..., H] -> logits [..., V] as the model's own forward makes them: through
    the output embedding, then Gemma-2's final soft cap (cap * tanh(logits / cap)) where the model has one,
    so that a fit's logits match the teacher's and vLLM's."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits
