"""The format-v1 reader: every atom record inside manifest.json, keys and gates inside each document's shard.

Loading a v1 bank reads (and with `verify`, hashes) every shard in full, so it costs one read of all factors;
`doc2atom bank upgrade` rewrites the manifest as format v2 and keeps every shard as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bank_interface import AtomRecord, BankSpec
from .bank_manifest import MANIFEST_NAME
from .errors import BankError, BankErrorKind
from .shard_files import SHARDS_DIR, StatKey, read_shard, shard_path


@dataclass
class V1Contents:
    atoms: list[AtomRecord] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    shard_names: list[str] = field(default_factory=list)  # relative to the bank: "shards/<file>"
    shard_shas: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    stats: list[StatKey] = field(default_factory=list)  # of each shard as read
    keys: np.ndarray | None = None
    gates: np.ndarray | None = None


def read_v1(path: Path, manifest: dict[str, Any], spec: BankSpec, verify: bool,
            manifest_changed: Callable[[], bool]) -> V1Contents:
    """Every document's records, and its shard's keys and gates (checked against the spec; with `verify`,
    hashed and every tensor finite)."""
    documents = manifest.get("documents")
    if not isinstance(documents, list):
        raise BankError(f"{MANIFEST_NAME}: 'documents' must be a list")
    out = V1Contents()
    keys: list[np.ndarray] = []
    gates: list[np.ndarray] = []
    seen_docs: set[str] = set()
    for entry in documents:
        try:
            doc_id, shard_name, sha, records = entry["id"], entry["shard"], entry["sha256"], entry["atoms"]
        except (KeyError, TypeError) as exc:
            raise BankError(f"{MANIFEST_NAME}: malformed document entry ({exc})") from exc
        if not (isinstance(doc_id, str) and isinstance(sha, str) and isinstance(records, list)):
            raise BankError(f"{MANIFEST_NAME}: malformed document entry {str(doc_id)[:80]!r}")
        if doc_id in seen_docs:
            raise BankError(f"{MANIFEST_NAME}: document {doc_id!r} listed twice")
        seen_docs.add(doc_id)
        doc_atoms = [AtomRecord.from_dict(r) for r in records]
        for atom in doc_atoms:
            if atom.document_id != doc_id:
                raise BankError(f"atom {atom.id!r} is listed under document {doc_id!r} "
                                f"but names {atom.document_id!r}")
        try:
            shard_file = shard_path(path, shard_name)
            relative = f"{SHARDS_DIR}/{shard_file.name}"
            shard_keys, shard_gates, stat = read_shard(shard_file, relative, spec, len(doc_atoms),
                                                        sha if verify else None)
        except BankError as exc:
            if manifest_changed():  # e.g. `bank remove` dropped the shard
                raise BankError("changed on disk while it was loaded; reload it",
                                kind=BankErrorKind.STALE) from exc
            raise
        out.doc_ids.append(doc_id)
        out.shard_names.append(relative)
        out.shard_shas.append(sha)
        out.counts.append(len(doc_atoms))
        out.stats.append(stat)
        out.atoms.extend(doc_atoms)
        keys.append(shard_keys)
        gates.append(shard_gates)
    ids = [a.id for a in out.atoms]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BankError(f"{MANIFEST_NAME}: atom id {dup!r} is not unique")
    out.keys = np.concatenate(keys) if keys else np.zeros((0, spec.key_dim), np.float32)
    out.gates = np.concatenate(gates) if gates else np.zeros((0, len(spec.targets)), np.float32)
    return out
