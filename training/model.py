"""The memory compiler (atom features -> micro-LoRA factors, gates) and the router's learned parts
(query/key projections into one key space, and the logistic router head).

Factors come from a learned basis: A_i = Σ_m c_im · basisA_m, B_i = Σ_m c_im · basisB_m with c = coeff(trunk(f_i)),
so every atom gets its own low-rank update from a few hundred parameters of the trunk's output.
B's basis starts near zero: before training every adapter is almost a no-op (the student is the base model),
yet gradients reach every part from the first step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vllm_doc2atom.bank import ATOM_TYPES, Target
from vllm_doc2atom.fingerprint import BaseModelFingerprint
from vllm_doc2atom.router import RouterHead


@dataclass
class CompilerConfig:
    base_model: dict  # BaseModelFingerprint.to_dict() of the model the factors are for
    targets: list[str] = field(default_factory=list)  # Target keys "<layer>.<module>"
    feature_dim: int = 576  # atom feature size (the base model's hidden size)
    text_dim: int = 384  # sentence-encoder size (questions and atom retrieval texts)
    key_dim: int = 384
    hidden: int = 512
    basis: int = 64  # factor basis size per target
    micro_rank: int = 4
    lora_scaling: float = 1.0

    def fingerprint(self) -> BaseModelFingerprint:
        return BaseModelFingerprint.from_dict(self.base_model)

    def target_list(self) -> list[Target]:
        return [Target.parse(k) for k in self.targets]

    def to_dict(self) -> dict:
        return asdict(self)


class MemoryCompiler(nn.Module):
    def __init__(self, config: CompilerConfig) -> None:
        super().__init__()
        self.config = config
        base, r, m = config.fingerprint(), config.micro_rank, config.basis
        self.trunk = nn.Sequential(nn.LayerNorm(config.feature_dim), nn.Linear(config.feature_dim, config.hidden),
                                   nn.GELU(), nn.Linear(config.hidden, config.hidden), nn.GELU())
        self.coeff = nn.ModuleDict()
        self.basis_a = nn.ParameterDict()
        self.basis_b = nn.ParameterDict()
        for target in config.target_list():
            d_in, d_out = base.module_shape(target.module)
            name = _param_name(target)
            self.coeff[name] = nn.Linear(config.hidden, m)
            self.basis_a[name] = nn.Parameter(torch.randn(m, r, d_in) / d_in**0.5)
            self.basis_b[name] = nn.Parameter(torch.randn(m, d_out, r) * 1e-4)
        self.gate = nn.Linear(config.hidden, len(config.targets))
        nn.init.constant_(self.gate.bias, 2.0)  # gates start open (~0.88)
        # Key space: atom texts and questions share the sentence encoder, each with its own projection.
        self.key_proj = nn.Parameter(torch.eye(config.text_dim, config.key_dim))
        self.query_proj = nn.Parameter(torch.eye(config.text_dim, config.key_dim))
        self.head = LearnedRouterHead()

    def forward(self, features: torch.Tensor) -> tuple[dict[Target, torch.Tensor], dict[Target, torch.Tensor],
                                                       torch.Tensor]:
        """features [n, F] -> A {target: [n, r, in]}, B {target: [n, out, r]}, gates [n, T] in (0, 1)."""
        h = self.trunk(features)
        a, b = {}, {}
        for target in self.config.target_list():
            name = _param_name(target)
            c = self.coeff[name](h)  # [n, M]
            a[target] = torch.einsum("nm,mri->nri", c, self.basis_a[name])
            b[target] = torch.einsum("nm,mor->nor", c, self.basis_b[name])
        return a, b, torch.sigmoid(self.gate(h))

    def keys(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(text_embeddings @ self.key_proj, dim=-1)

    def queries(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(text_embeddings @ self.query_proj, dim=-1)


class LearnedRouterHead(nn.Module):
    """Trainable twin of vllm_doc2atom.router.RouterHead: similarity plus the atoms' metadata (type prior,
    answer-bearing flag, confidence), exported with `metadata=True` so the server applies all of it."""

    def __init__(self) -> None:
        super().__init__()
        defaults = RouterHead()
        self.sim_scale = nn.Parameter(torch.tensor(defaults.sim_scale))
        self.sim_center = nn.Parameter(torch.tensor(defaults.sim_center))
        self.type_bias = nn.Parameter(torch.zeros(len(ATOM_TYPES)))
        self.answer_bearing_bias = nn.Parameter(torch.zeros(()))
        self.confidence_scale = nn.Parameter(torch.zeros(()))

    def forward(self, similarity: torch.Tensor, types: torch.Tensor, answer_bearing: torch.Tensor,
                confidence: torch.Tensor) -> torch.Tensor:
        """Router logits (weights are their sigmoid): similarity [..., n]; types, answer_bearing, confidence [n]."""
        return (self.sim_scale * (similarity - self.sim_center) + self.type_bias[types]
                + self.answer_bearing_bias * answer_bearing + self.confidence_scale * (confidence - 1.0))

    def export(self) -> RouterHead:
        value = lambda t: float(t.detach())  # noqa: E731  (parameters: detached, no autograd warning)
        return RouterHead(sim_scale=value(self.sim_scale), sim_center=value(self.sim_center),
                          type_bias={t: value(b) for t, b in zip(ATOM_TYPES, self.type_bias)},
                          answer_bearing_bias=value(self.answer_bearing_bias),
                          confidence_scale=value(self.confidence_scale), metadata=True)


def _param_name(target: Target) -> str:
    return f"l{target.layer}_{target.module}"  # ModuleDict keys cannot contain dots
