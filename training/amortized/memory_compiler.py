"""The memory compiler (atom inputs -> micro-LoRA factors, gates) and the router's learned parts
(query/key projections into one key space, and the logistic router head).

Each rank of an atom's micro-LoRA is a *slot* that reads the atom's tokens by attention:
    α_s = softmax over the atom's tokens of q_s · W_key LN(states)  (q_s learned, shifted by the trunk's h)
    A_s = W_read (α_s LN(states))      what the slot listens for in the adapted layer's input
    B_s = W_write (α_s embeddings)     what it writes: the identity of the tokens it read
The factors therefore keep token identity (a name or a number can be copied into the residual stream instead
of squeezed through a pooled vector), with one set of read/write maps shared by every atom, which is what lets
the compiler generalise to documents it never saw. W_write starts near zero: before training every adapter is
almost a no-op (the student is the base model), as in LoRA, yet gradients reach every part from the first step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vllm_doc2atom.bank_interface import ATOM_TYPES, Target
from vllm_doc2atom.fingerprint import BaseModelFingerprint
from vllm_doc2atom.router_head import RouterHead

from .atom_inputs import AtomInputs


@dataclass
class CompilerConfig:
    base_model: dict  # BaseModelFingerprint.to_dict() of the model the factors are for
    targets: list[str] = field(default_factory=list)  # Target keys "<layer>.<module>"
    feature_dim: int = 576  # atom feature size (the base model's hidden size)
    text_dim: int = 384  # sentence-encoder size (questions and atom retrieval texts)
    key_dim: int = 384
    hidden: int = 512  # trunk width (pooled atom state -> gates, slot query shifts)
    slot_dim: int = 64  # attention size of the slots that read the atom's tokens
    micro_rank: int = 4  # slots per target
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
        base, r, d, f = config.fingerprint(), config.micro_rank, config.slot_dim, config.feature_dim
        self.trunk = nn.Sequential(nn.LayerNorm(f), nn.Linear(f, config.hidden), nn.GELU(),
                                   nn.Linear(config.hidden, config.hidden), nn.GELU())
        self.norm = nn.LayerNorm(f)
        self.token_key = nn.Linear(f, d, bias=False)
        self.slot_query = nn.ParameterDict()
        self.slot_shift = nn.ModuleDict()
        self.read = nn.ModuleDict()
        self.write = nn.ModuleDict()
        for target in config.target_list():
            d_in, d_out = base.module_shape(target.module)
            name = _param_name(target)
            self.slot_query[name] = nn.Parameter(torch.randn(r, d))
            self.slot_shift[name] = nn.Linear(config.hidden, r * d)
            nn.init.zeros_(self.slot_shift[name].weight)
            self.read[name] = nn.Linear(f, d_in, bias=False)
            nn.init.normal_(self.read[name].weight, std=4.0 / (f * d_in) ** 0.5)  # rows of A: norm ~4
            self.write[name] = nn.Linear(base.hidden_size, d_out, bias=False)
            nn.init.normal_(self.write[name].weight, std=1e-4)
        self.gate = nn.Linear(config.hidden, len(config.targets))
        nn.init.constant_(self.gate.bias, 2.0)  # gates start open (~0.88)
        # Key space: atom texts and questions share the sentence encoder, each with its own projection.
        self.key_proj = nn.Parameter(torch.eye(config.text_dim, config.key_dim))
        self.query_proj = nn.Parameter(torch.eye(config.text_dim, config.key_dim))
        self.head = TrainableRouterHead()

    def forward(self, inputs: AtomInputs) -> tuple[dict[Target, torch.Tensor], dict[Target, torch.Tensor],
                                                   torch.Tensor]:
        """n atoms' inputs -> A {target: [n, r, in]}, B {target: [n, out, r]}, gates [n, T] in (0, 1)."""
        h = self.trunk(inputs.pooled)
        states = self.norm(inputs.states)
        keys = self.token_key(states)  # [n, t, d]
        mask = inputs.mask.clone()
        mask[:, 0] |= ~mask.any(1)  # an atom without tokens reads its (zero) padding instead of NaNs
        n, r, d = len(inputs), self.config.micro_rank, self.config.slot_dim
        a, b = {}, {}
        for target in self.config.target_list():
            name = _param_name(target)
            queries = self.slot_query[name] + self.slot_shift[name](h).view(n, r, d)
            scores = torch.einsum("nrd,ntd->nrt", queries, keys) / d**0.5
            attention = scores.masked_fill(~mask[:, None, :], -torch.inf).softmax(-1)  # [n, r, t]
            a[target] = self.read[name](attention @ states)
            b[target] = self.write[name](attention @ inputs.embeddings).transpose(1, 2)
        return a, b, torch.sigmoid(self.gate(h))

    def keys(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(text_embeddings @ self.key_proj, dim=-1)

    def queries(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(text_embeddings @ self.query_proj, dim=-1)


class TrainableRouterHead(nn.Module):
    """The router head as torch parameters, trained with the compiler; `export()` freezes it into the plugin's
    vllm_doc2atom.router_head.RouterHead that the server applies: similarity plus the atoms' metadata (type
    prior, answer-bearing flag, confidence), exported with `metadata=True` so the server applies all of it."""

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
        """Router logits (weights are their sigmoid): similarity [..., n]; types, answer_bearing,
        confidence [n]."""
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
