"""A bank's manifest.json, the commit point of every change: read with the stat of exactly the bytes read,
written atomically. Also how a vanished or unreadable bank file becomes a BankError: "stale" when the manifest
changed meanwhile (a writer removed the file after its swap), else "invalid"."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BankError, BankErrorKind
from .files import atomic_write_text
from .shard_files import StatKey, stat_key, stat_or_none

if TYPE_CHECKING:
    from .bank_index import StoredIndexInfo
    from .bank_interface import BankSpec
    from .bank_rows import DocumentTable
    from .bank_segments import SegmentInfo

FORMAT_NAME = "doc2atom-atom-bank"
FORMAT_VERSION = 2  # what this build writes
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"


def read_manifest(bank: Path) -> tuple[dict[str, Any], str, StatKey]:
    """(manifest, sha256 of its bytes, stat of exactly the file read), its format and version checked."""
    if not bank.is_dir():
        raise BankError("no atom bank there (not a directory)", kind=BankErrorKind.NOT_FOUND)
    if not (bank / MANIFEST_NAME).is_file():
        raise BankError(f"not an atom bank: missing {MANIFEST_NAME}")
    try:
        with open(bank / MANIFEST_NAME, "rb") as f:
            stat = stat_key(os.fstat(f.fileno()))
            raw = f.read()
    except OSError as exc:
        raise BankError(f"cannot read {MANIFEST_NAME} ({exc.strerror or type(exc).__name__})") from exc
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankError(f"{MANIFEST_NAME}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BankError(f"{MANIFEST_NAME}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version not in READ_VERSIONS or type(version) is not int:
        raise BankError(f"unknown bank format version {repr(version)[:20]} (this build reads "
                        f"{', '.join(map(str, READ_VERSIONS))})")
    return manifest, hashlib.sha256(raw).hexdigest(), stat


def write_manifest(bank: Path, spec: BankSpec, segments: Sequence[SegmentInfo], table: DocumentTable,
                   index: StoredIndexInfo | None = None) -> None:
    """The v2 manifest: spec, segments, the documents as a table of columns (no atom records) and the stored
    stage-1 index, if any (bank_index.py)."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "segments": [s.to_dict() for s in segments],
        "documents": table.to_manifest(),
        **({} if index is None else {"index": index.to_dict()}),
    }
    atomic_write_text(bank / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def file_error(bank: Path, manifest_stat: StatKey | None, prefix: str, label: str, exc: OSError) -> BankError:
    """A bank file (`label`: "segment segments/<name>", ...) that cannot be read."""
    changed = manifest_stat is None or stat_or_none(bank / MANIFEST_NAME) != manifest_stat
    if isinstance(exc, FileNotFoundError):
        if changed:
            return BankError(f"{prefix}changed on disk while in use ({label} is gone); reload it",
                             kind=BankErrorKind.STALE)
        return BankError(f"{prefix}{label} is missing")
    return BankError(f"{prefix}{label} cannot be read ({exc.strerror or type(exc).__name__})")
