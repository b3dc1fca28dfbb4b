"""The first half of every compile mode: document files -> texts -> typed atoms."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..atomize.rules import RuleAtomizer
from ..inputs import InputError, read_text
from ..router.routing_text import ROUTING_TEXTS, TitledAtomizer

logger = logging.getLogger(__name__)

JSONL_RECORD = '{"id": ..., "text": ...}'


def read_documents(paths: list[str | Path]) -> dict[str, str]:
    """.txt / .md files (id = file stem) and .jsonl files of {"id", "text"} (or {"document_id", "document"}),
    all UTF-8. An empty document is skipped with a warning; a missing, unreadable or malformed file raises
    InputError naming it."""
    documents: dict[str, str] = {}
    for path in map(Path, paths):
        found = _jsonl_documents(path) if path.suffix == ".jsonl" else {path.stem: read_text(path)}
        for doc_id, text in found.items():
            if text.strip():
                documents[doc_id] = text
            else:
                logger.warning("%s: document %r is empty, skipped", path, doc_id)
    return documents


def _jsonl_documents(path: Path) -> dict[str, str]:
    lines = read_text(path, "document file").splitlines()
    return dict(_jsonl_document(path, n, line) for n, line in enumerate(lines, 1) if line.strip())


def _jsonl_document(path: Path, n: int, line: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {n} is not JSON ({err.msg}): write one {JSONL_RECORD} per "
                         "line") from err
    text = record.get("text", record.get("document")) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise InputError(f'{path}: line {n} has no "text" string: write one {JSONL_RECORD} per line')
    return str(record.get("id") or record.get("document_id") or f"{path.stem}-{n}"), text


def make_atomizer(name: str, routing_text: str = "atom"):
    """The atomizer `name` (rules or chunks); with routing_text "titled", its atoms' retrieval text (what the
    keys encode) becomes "<what the document is about>: <atom text>" (`training.router.routing_text`)."""
    if routing_text not in ROUTING_TEXTS:
        raise ValueError(f"unknown routing text {routing_text!r} ({' or '.join(ROUTING_TEXTS)})")
    if name == "rules":
        atomizer = RuleAtomizer()
    elif name == "chunks":  # the d2l_raw baseline: fixed windows
        from ..atomize.chunks import ChunkAtomizer

        atomizer = ChunkAtomizer()
    else:
        raise ValueError(f"unknown atomizer {name!r} for compile (rules or chunks)")
    return TitledAtomizer(atomizer) if routing_text == "titled" else atomizer


