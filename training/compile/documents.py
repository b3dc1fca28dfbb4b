"""The first half of every compile mode: document files -> texts -> typed atoms."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomize.rules import RuleAtomizer


def read_documents(paths: list[str | Path]) -> dict[str, str]:
    """.txt / .md files (id = file stem) and .jsonl files of {"id", "text"} (or {"document_id", "document"})."""
    documents: dict[str, str] = {}
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    doc_id = record.get("id") or record.get("document_id") or f"{path.stem}-{n}"
                    documents[str(doc_id)] = record.get("text") or record["document"]
        else:
            documents[path.stem] = path.read_text(encoding="utf-8")
    return documents



def make_atomizer(name: str):
    if name == "rules":
        return RuleAtomizer()
    if name == "chunks":  # the d2l_raw baseline: fixed windows
        from ..atomize.chunks import ChunkAtomizer

        return ChunkAtomizer()
    raise ValueError(f"unknown atomizer {name!r} for compile (rules or chunks)")


