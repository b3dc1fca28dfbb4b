"""Deterministic train / validation / test splits BY DOCUMENT, so no document is ever on both sides."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")


def split_of(document_id: str, validation: float = 0.1, test: float = 0.1, salt: str = "doc2atom-v1") -> str:
    """The split of a document: a hash of its id, so it never changes as the corpus grows."""
    bucket = int(hashlib.sha256(f"{salt}:{document_id}".encode()).hexdigest()[:8], 16) / 0x100000000
    if bucket < test:
        return "test"
    if bucket < test + validation:
        return "validation"
    return "train"
