"""Compile modes `amortized` (the paper's: one forward pass of a trained memory compiler per atom) and
`optimize` (then a few steps of context distillation per atom: see `refine_atom`). The bank carries the trained
query projection and router head, so a server routes it exactly as it was trained.

The base model runs where a `training.device.DeviceConfig` says (default: the CPU, float32); the compiler and
the factors it writes stay float32 on the CPU (it is small), and optimize mode refines each atom's factors in
float32 on the base model's device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.bank_interface import BankSpec, DocumentAtoms, Target
from vllm_doc2atom.fingerprint import BaseModelFingerprint

from .. import losses
from ..amortized.atom_inputs import atom_features
from ..amortized.checkpoint import load_compiler
from ..device import DeviceConfig, model_device
from ..student import LoRAHooks
from .documents import make_atomizer

logger = logging.getLogger(__name__)


@dataclass
class RefineConfig:
    steps: int = 8  # optimizer steps per atom
    lr: float = 1e-3


def refine_atom(model, tokenizer, hooks: LoRAHooks, document: str, atom_text: str, targets: list[Target],
                a: dict[Target, torch.Tensor], b: dict[Target, torch.Tensor], scale: torch.Tensor,
                config: RefineConfig) -> tuple[float, float]:
    """Context distillation of ONE atom's micro-LoRA: the base model with the document in context is the
    teacher of the atom text's second half given its first half; the student sees only that first half,
    with the atom's adapter. a/b (float32, on the model's device) are updated in place; returns the KL before
    and after."""
    words = atom_text.split()
    if len(words) < 4:
        return math.nan, math.nan
    cut = len(" ".join(words[: len(words) // 2]))
    prefix = tokenizer(atom_text[:cut], add_special_tokens=False)["input_ids"]
    continuation = tokenizer(atom_text[cut:], add_special_tokens=False)["input_ids"]
    context = tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"]
    device = model_device(model)
    with torch.no_grad():  # logits in float32 whatever the model's dtype: the KL is taken in float32
        teacher = model(torch.tensor([context + prefix + continuation], device=device)).logits[
            0, len(context) + len(prefix) - 1:-1].float()
    student_ids = torch.tensor([prefix + continuation], device=device)
    params = [p.requires_grad_(True) for t in targets for p in (a[t], b[t])]
    optimizer = torch.optim.Adam(params, lr=config.lr)

    def kl() -> torch.Tensor:
        factors = {t: (scale[j] * a[t][None], b[t][None]) for j, t in enumerate(targets)}
        with hooks.active(factors):
            student = model(student_ids).logits[0, len(prefix) - 1:-1].float()
        return losses.logits_kl(teacher, student)

    with torch.no_grad():
        before = float(kl())
    for _ in range(config.steps):
        loss = kl()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(kl())
    for p in params:
        p.requires_grad_(False)
    return before, after


class AmortizedCompiler:
    """A trained checkpoint loaded with its base model: turns one document at a time into bank-ready atoms."""

    def __init__(self, checkpoint: str | Path, model_dir: str | Path | None = None, mode: str = "amortized",
                 refine: RefineConfig | None = None, atomizer: str = "rules",
                 routing_text: str = "atom", device: DeviceConfig | None = None) -> None:
        from transformers import AutoTokenizer

        from vllm_doc2atom.encoders import SentenceTransformerEncoder

        from ..models import resolve_model

        if mode not in ("amortized", "optimize"):
            raise ValueError(f"unknown compile mode {mode!r} (amortized or optimize)")
        self.compiler, self.meta = load_compiler(checkpoint)
        model_name = str(model_dir or self.meta["train"]["model"])
        model_dir = resolve_model(model_name)
        base = BaseModelFingerprint.from_model_dir(model_dir)
        diffs = self.compiler.config.fingerprint().differences(base)
        if diffs:
            raise ValueError(f"checkpoint {checkpoint} was trained for another base model: {'; '.join(diffs)}")
        self.mode, self.refine = mode, refine or RefineConfig()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = device or DeviceConfig()
        self.model = self.device.load_causal_lm(model_dir)
        self.projection = self.compiler.query_proj.detach().numpy()
        self.sentences = SentenceTransformerEncoder()  # atom texts: raw; the compiler's key projection follows
        encoder = self.sentences.with_projection(self.projection)  # questions, as the server will encode them
        config = self.compiler.config
        self.targets = config.target_list()
        calibrated = self.meta.get("router_calibration", {}).get("threshold")  # `doc2atom checkpoint calibrate`
        self.spec = BankSpec(base_model=base, targets=self.targets, micro_rank=config.micro_rank,
                             lora_scaling=config.lora_scaling, key_encoder=encoder.identity,
                             key_dim=config.key_dim,
                             checkpoint=self.meta.get("exported_from")
                             or f"{Path(checkpoint).resolve().parent.name}@step{self.meta['step']}",
                             router_head=asdict(replace(self.compiler.head.export(), threshold=calibrated)))
        self.atomizer = make_atomizer(atomizer, routing_text)
        self.hooks = LoRAHooks(self.model, self.targets) if mode == "optimize" else None
        self.kl_before: list[float] = []
        self.kl_after: list[float] = []

    def __call__(self, doc_id: str, text: str) -> DocumentAtoms | None:
        """Atoms of one document with their factors, gates and keys; None for a document without atoms."""
        atoms = self.atomizer(doc_id, text)
        if not atoms:
            logger.warning("%s: no atoms (empty document?), skipped", doc_id)
            return None
        with torch.no_grad():
            features = atom_features(self.model, self.tokenizer, text, [a.span for a in atoms],
                                     self.meta["encoder_layer"])
            a, b, gates = self.compiler(features)
        if self.hooks is not None:
            device = self.device.torch_device
            for i, atom in enumerate(atoms):
                rows_a = {t: a[t][i].clone().to(device) for t in self.targets}
                rows_b = {t: b[t][i].clone().to(device) for t in self.targets}
                scale = (gates[i] * self.compiler.config.lora_scaling).to(device)
                before, after = refine_atom(self.model, self.tokenizer, self.hooks, text, atom.text, self.targets,
                                            rows_a, rows_b, scale, self.refine)
                for t in self.targets:
                    a[t][i], b[t][i] = rows_a[t].detach().cpu(), rows_b[t].detach().cpu()
                if not math.isnan(before):
                    self.kl_before.append(before)
                    self.kl_after.append(after)
        embeddings = torch.from_numpy(self.sentences.encode([x.retrieval_text or x.text for x in atoms]))
        tensors = {f"A.{t.key}": a[t] for t in self.targets}
        tensors |= {f"B.{t.key}": b[t] for t in self.targets}
        tensors |= {"gates": gates, "keys": self.compiler.keys(embeddings)}
        return DocumentAtoms(doc_id, atoms, tensors)

    def create_bank(self, out: str | Path, compiled: list[DocumentAtoms], overwrite: bool = False) -> AtomBank:
        return AtomBank.create(out, self.spec, compiled, overwrite=overwrite, query_projection=self.projection)

    def compatible(self, spec: BankSpec) -> bool:
        """Can atoms compiled now be added to a bank of this spec (same weights, targets, calibration)?"""
        return spec == self.spec

    def stats(self) -> dict[str, float | str]:
        """The device and dtype; optimize mode: how much closer the atoms' adapters got to the teacher."""
        if not self.kl_before:
            return self.device.describe()
        return {**self.device.describe(),
                "context_kl_before": round(sum(self.kl_before) / len(self.kl_before), 4),
                "context_kl_after": round(sum(self.kl_after) / len(self.kl_after), 4)}


