"""Banks with real atoms and keys but UNTRAINED (random) micro-LoRA factors.

A fixture of the tests and benchmarks (not shipped in the package): they exercise the runtime core (bank
format, routing, composition, PEFT/vLLM loading) without fitting anything. The rule-based atomizer supplies
the atoms, one per sentence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from training.atomize.rules import RuleAtomizer, RuleAtomizerConfig
from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.bank_interface import BankSpec, DocumentAtoms, Target
from vllm_doc2atom.encoders import QueryEncoder
from vllm_doc2atom.fingerprint import BaseModelFingerprint


def default_spec(model_dir: str | Path, encoder: QueryEncoder, modules: Sequence[str] = ("down_proj",),
                 last_layers: int = 4, micro_rank: int = 2, lora_scaling: float = 1.0) -> BankSpec:
    """Adapt `modules` in the last `last_layers` layers of the model at model_dir."""
    base = BaseModelFingerprint.from_model_dir(model_dir)
    layers = range(base.num_layers - last_layers, base.num_layers)
    return BankSpec(base_model=base, targets=[Target(m, layer) for layer in layers for m in modules],
                    micro_rank=micro_rank, lora_scaling=lora_scaling, key_encoder=encoder.identity,
                    key_dim=encoder.dim, checkpoint="untrained-random")


def random_tensors(spec: BankSpec, keys: torch.Tensor, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Random factors and gates for len(keys) atoms, in the shard layout of `spec`."""
    generator = torch.Generator().manual_seed(seed)
    n = keys.shape[0]
    tensors = {name: torch.randn(shape, generator=generator) * scale
               for name, shape in spec.expected_shapes(n).items() if name[:2] in ("A.", "B.")}
    tensors["gates"] = torch.rand((n, len(spec.targets)), generator=generator)
    tensors["keys"] = keys.float()
    return tensors


def untrained_documents(spec: BankSpec, documents: Mapping[str, str], encoder: QueryEncoder, seed: int = 0,
                        scale: float = 0.02) -> list[DocumentAtoms]:
    """Sentence atoms keyed by `encoder`, with random factors, ready to be written into a bank."""
    atomizer = RuleAtomizer(RuleAtomizerConfig(split_clauses=False))
    docs = []
    for n, (doc_id, text) in enumerate(sorted(documents.items())):
        atoms = atomizer(doc_id, text)
        keys = torch.from_numpy(encoder.encode([a.retrieval_text for a in atoms]))
        docs.append(DocumentAtoms(doc_id, atoms, random_tensors(spec, keys, seed + n, scale)))
    return docs


def build_untrained_bank(path: str | Path, spec: BankSpec, documents: Mapping[str, str], encoder: QueryEncoder,
                         seed: int = 0, scale: float = 0.02, overwrite: bool = True) -> AtomBank:
    """A well-formed bank of `untrained_documents` for the runtime core."""
    return AtomBank.create(path, spec, untrained_documents(spec, documents, encoder, seed, scale),
                           overwrite=overwrite)
