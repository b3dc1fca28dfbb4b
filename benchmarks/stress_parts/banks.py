"""Untrained banks of the example documents, built in the temp bank root before and during the run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .common import EXAMPLE_DOCS, BankNames

if TYPE_CHECKING:
    from vllm_doc2atom.bank_interface import DocumentAtoms


class MemoEncoder:
    """The packaged sentence encoder, remembering what it encoded: the banks rebuilt during the run re-encode
    the same atoms, and a rebuild must take file-writing time, not seconds of CPU beside the server."""

    def __init__(self) -> None:
        from vllm_doc2atom.encoders import SentenceTransformerEncoder

        self.inner = SentenceTransformerEncoder()
        self.identity, self.dim = self.inner.identity, self.inner.dim
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.inner.encode(new), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else self.inner.encode([])


class BankFactory:
    """Untrained banks of the example documents (tests/untrained_bank.py), as tests/serving.py builds them."""

    def __init__(self, model_dir: Path, root: Path) -> None:
        from tests.untrained_bank import default_spec

        self.root = root
        self.encoder = MemoEncoder()
        self.documents = {p.stem: p.read_text() for p in sorted(EXAMPLE_DOCS.glob("*.md"))}
        modules = ("q_proj", "v_proj", "down_proj")
        self.spec = default_spec(model_dir, self.encoder, modules=modules, last_layers=2)
        self.wide_spec = default_spec(model_dir, self.encoder, last_layers=2, micro_rank=4)

    def build(self, name: str, seed: int, wide: bool = False) -> None:
        """Build (or atomically replace) bank `name`; large random factors, like the test server's."""
        from tests.untrained_bank import build_untrained_bank

        spec = self.wide_spec if wide else self.spec
        build_untrained_bank(self.root / name, spec, self.documents, self.encoder, seed=seed, scale=0.3,
                             overwrite=True)

    def document(self, doc_id: str, seed: int) -> DocumentAtoms:
        """One example document as DocumentAtoms in the default spec's layout (for AtomBank.add_documents)."""
        import torch

        from tests.untrained_bank import random_tensors
        from training.atomize.rules import RuleAtomizer, RuleAtomizerConfig
        from vllm_doc2atom.bank_interface import DocumentAtoms

        atoms = RuleAtomizer(RuleAtomizerConfig(split_clauses=False))(doc_id, self.documents[doc_id])
        keys = torch.from_numpy(self.encoder.encode([a.retrieval_text for a in atoms]))
        return DocumentAtoms(doc_id, atoms, random_tensors(self.spec, keys, seed, scale=0.3))

    def build_all(self, names: BankNames) -> None:
        every = [*names.healthy, names.swapped, names.edited, *names.corrupt]
        for seed, name in enumerate(every):
            self.build(name, seed)
        self.build(names.wide, 100, wide=True)
