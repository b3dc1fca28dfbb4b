"""Format-v1 banks for tests: this build reads v1 (and upgrades it) but writes only v2."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vllm_doc2atom.bank_interface import BankSpec, DocumentAtoms
from vllm_doc2atom.bank_manifest import FORMAT_NAME, MANIFEST_NAME
from vllm_doc2atom.shard_files import SHARDS_DIR, shard_name, write_shard


def write_v1_bank(path: Path, spec: BankSpec, documents: Sequence[DocumentAtoms]) -> Path:
    """A v1 bank as the previous build wrote it: every atom record in the manifest, one shard per document."""
    (path / SHARDS_DIR).mkdir(parents=True)
    entries = []
    for doc in documents:
        sha = write_shard(path, spec, doc)
        entries.append({"id": doc.document_id, "shard": shard_name(sha), "sha256": sha,
                        "num_atoms": len(doc.atoms), "atoms": [a.to_dict() for a in doc.atoms]})
    manifest = {"format": FORMAT_NAME, "format_version": 1, "spec": spec.to_dict(), "documents": entries}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return path
