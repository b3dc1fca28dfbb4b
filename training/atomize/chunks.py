"""Fixed-size raw chunks as "atoms": the input of the Doc-to-LoRA baseline `d2l_raw` (no semantic cuts)."""

from __future__ import annotations

import re

from vllm_doc2atom.bank_interface import AtomRecord


class ChunkAtomizer:
    """Consecutive windows of `words` words, with exact spans; every chunk is an untyped evidence fragment."""

    def __init__(self, words: int = 48) -> None:
        self.words = words

    def __call__(self, document_id: str, text: str) -> list[AtomRecord]:
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        atoms = []
        for i in range(0, len(spans), self.words):
            start, end = spans[i][0], spans[min(i + self.words, len(spans)) - 1][1]
            atoms.append(AtomRecord(id=f"{document_id}#{len(atoms)}", document_id=document_id,
                                    type="evidence_fragment", text=text[start:end], span=(start, end),
                                    answer_bearing=True, retrieval_text=text[start:end]))
        return atoms
