"""Atom bank format v1: a directory with a JSON manifest and one safetensors shard per document.

    BANK/
      manifest.json                  spec (base model, targets, rank, key encoder) + atom records per document
      query_projection.safetensors   optional `projection` [d_text, key_dim] of a trained query encoder
      shards/<sha256[:16]>.safetensors   one document's stacked tensors, row i = the document's atom i:
                                       A.<layer>.<module>  [n, r, in]    micro-LoRA down factors
                                       B.<layer>.<module>  [n, out, r]   micro-LoRA up factors
                                       gates               [n, T]        per-target write gate in [0, 1]
                                       keys                [n, key_dim]  provenance (retrieval) keys

The manifest is the commit point: shards are content-addressed and immutable, so adding or
removing a document writes or drops one shard and then atomically replaces the manifest;
the other documents' files are never touched. The stage-1 index is rebuilt from `keys` on load.
Nothing is pickled: safetensors + JSON only.

Every read of a shard's factors checks its bytes against the manifest's sha256, so a shard changed,
truncated or deleted under a running server is a BankError, never NaN factors or a crash; a loaded bank
also remembers each shard's stat, so `check_files` can notice a change with one stat per shard. Error
messages name the bank by its `name` and files relative to the bank.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bank_interface import AtomRecord, BankSpec, DocumentAtoms, Target
from .errors import BankError, BankErrorKind
from .files import atomic_directory, atomic_write_text, make_readable
from .fingerprint import BaseModelFingerprint
from .shard_files import (
    SHARDS_DIR,
    StatKey,
    read_checked,
    read_shard,
    shard_path,
    stat_key,
    stat_or_none,
    write_shard,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_NAME = "doc2atom-atom-bank"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUERY_PROJECTION = "query_projection.safetensors"  # optional: maps the sentence encoder into the key space
RERANKER_FOLDER = "reranker"  # optional: the bank's own copy of a reranker that is not shipped with doc2atom


@dataclass
class _Shard:
    document_id: str
    path: Path
    name: str  # relative to the bank ("shards/<sha>.safetensors"): how messages name it
    sha256: str
    first_row: int  # global index of the shard's first atom
    num_atoms: int
    stat: StatKey  # of the file whose content was verified; updated when a changed file re-hashes equal


class AtomBank:
    """A loaded, validated atom bank. Keys and gates are in memory; factors are read on demand."""

    def __init__(self, path: Path, spec: BankSpec, atoms: list[AtomRecord], shards: list[_Shard],
                 keys: np.ndarray, gates: np.ndarray, manifest_sha256: str, manifest_stat: StatKey | None = None,
                 name: str | None = None) -> None:
        self.path = path
        self.name = str(path) if name is None else name  # how messages name the bank (a server: the request's)
        self.spec = spec
        self.atoms = atoms
        self.keys = keys  # [N, key_dim] float32
        self.gates = gates  # [N, T] float32
        self.fingerprint = manifest_sha256  # changes with any change of content
        self._shards = shards
        self._starts = [s.first_row for s in shards]
        self._manifest_stat = manifest_stat  # None: unknown, so any missing shard counts as a manifest change

    def __len__(self) -> int:
        return len(self.atoms)

    def __repr__(self) -> str:
        return f"AtomBank({self.name!r}, atoms={len(self)}, documents={len(self._shards)})"

    @property
    def document_ids(self) -> list[str]:
        return [s.document_id for s in self._shards]

    # ---- reading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, expect_base: BaseModelFingerprint | None = None,
             verify: bool = True, name: str | None = None) -> AtomBank:
        """Load and validate a bank. `verify` also checks shard hashes and that every factor is finite.

        Every error is a BankError that names the bank as `name` (default: its path) and its files relative
        to it: a server passes the request's bank name so that no message reveals where banks live on disk.
        """
        path = Path(path)
        label = str(path) if name is None else name
        try:
            return cls._load(path, expect_base, verify, label)
        except BankError as exc:
            raise BankError(f"bank {label!r}: {exc}", kind=exc.kind) from exc
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # A manifest shaped in a way no check above foresaw: still the bank's fault, not a server error.
            logger.warning("bank %s: unexpected %s while loading: %s", path, type(exc).__name__, exc)
            raise BankError(f"bank {label!r}: malformed manifest ({type(exc).__name__})") from exc

    @classmethod
    def _load(cls, path: Path, expect_base: BaseModelFingerprint | None, verify: bool, label: str) -> AtomBank:
        if not path.is_dir():
            raise BankError("no atom bank there (not a directory)", kind=BankErrorKind.NOT_FOUND)
        if not (path / MANIFEST_NAME).is_file():
            raise BankError(f"not an atom bank: missing {MANIFEST_NAME}")
        try:
            with open(path / MANIFEST_NAME, "rb") as f:
                manifest_stat = stat_key(os.fstat(f.fileno()))  # of exactly the bytes read
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
        if version != FORMAT_VERSION:
            shown = repr(version)[:20]
            raise BankError(f"unknown bank format version {shown} (this build reads {FORMAT_VERSION})")
        spec = BankSpec.from_dict(manifest.get("spec") or {})
        if expect_base is not None:
            diffs = spec.base_model.differences(expect_base)
            if diffs:
                raise BankError(
                    f"compiled for base model {spec.base_model.name!r}, which does not match the "
                    f"served model {expect_base.name!r}: " + "; ".join(diffs), kind=BankErrorKind.MISMATCH)

        documents = manifest.get("documents")
        if not isinstance(documents, list):
            raise BankError(f"{MANIFEST_NAME}: 'documents' must be a list")
        atoms: list[AtomRecord] = []
        shards: list[_Shard] = []
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
                if stat_or_none(path / MANIFEST_NAME) != manifest_stat:  # e.g. `bank remove` dropped the shard
                    raise BankError("changed on disk while it was loaded; reload it", kind=BankErrorKind.STALE) from exc
                raise
            shards.append(_Shard(doc_id, shard_file, relative, sha, len(atoms), len(doc_atoms), stat))
            atoms.extend(doc_atoms)
            keys.append(shard_keys)
            gates.append(shard_gates)
        ids = [a.id for a in atoms]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise BankError(f"{MANIFEST_NAME}: atom id {dup!r} is not unique")
        return cls(
            path=path, spec=spec, atoms=atoms, shards=shards,
            keys=np.concatenate(keys) if keys else np.zeros((0, spec.key_dim), np.float32),
            gates=np.concatenate(gates) if gates else np.zeros((0, len(spec.targets)), np.float32),
            manifest_sha256=hashlib.sha256(raw).hexdigest(), manifest_stat=manifest_stat, name=label,
        )

    def factors(self, indices: Sequence[int]) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
        """Micro-LoRA factors of the given atoms: target -> (A [k, r, in], B [k, out, r]), float32.

        Every shard read is checked against the manifest's sha256 (see `_read_verified`): a shard that is
        gone because the bank changed raises BankError kind "stale" (reload the bank and retry); a missing,
        truncated or changed one, kind "invalid".
        """
        import torch

        if not indices:
            raise ValueError("no atoms selected")
        rows: dict[str, list[torch.Tensor]] = {}
        by_shard: dict[int, list[tuple[int, int]]] = {}  # shard no. -> [(position in output, row)]
        for pos, i in enumerate(indices):
            shard_no = self._shard_no(i)
            by_shard.setdefault(shard_no, []).append((pos, i - self._shards[shard_no].first_row))
        for shard_no, picks in by_shard.items():
            tensors = self._read_verified(self._shards[shard_no])
            for name in (f"{ab}.{t.key}" for t in self.spec.targets for ab in "AB"):
                column = rows.setdefault(name, [None] * len(indices))  # type: ignore[list-item]
                for pos, row in picks:
                    column[pos] = tensors[name][row : row + 1]
        return {t: (torch.cat(rows[f"A.{t.key}"]).float(), torch.cat(rows[f"B.{t.key}"]).float())
                for t in self.spec.targets}

    def check_files(self, shards: bool = True) -> None:
        """Is the bank on disk still the one loaded? Stats the manifest and (with `shards`) every shard,
        re-hashing only shards whose stat changed. Raises BankError kind "stale" when the manifest changed
        (reload the bank), kind "invalid" when a shard is missing, unreadable or no longer matches."""
        if self._manifest_changed():
            raise BankError(f"bank {self.name!r} changed on disk; reload it", kind=BankErrorKind.STALE)
        for shard in self._shards if shards else ():
            try:
                unchanged = stat_key(os.stat(shard.path)) == shard.stat
            except FileNotFoundError:
                raise self._missing(shard) from None
            except OSError as exc:
                raise self._unreadable(shard, exc) from exc
            if not unchanged:
                self._read_verified(shard)

    def bank_name_of(self, index: int) -> str:
        """Every atom comes from this bank (a BankUnion answers per member)."""
        self._shard_no(index)  # the same IndexError as a union's
        return self.name

    def shard_label(self, index: int) -> str:
        """Which file holds an atom's factors, for messages: "shard shards/<sha>.safetensors"."""
        return f"shard {self._shards[self._shard_no(index)].name}"

    def _read_verified(self, shard: _Shard) -> dict[str, torch.Tensor]:
        """A shard's tensors, read whole and checked against the manifest's sha256 (about a millisecond
        per MB): whatever happened to the file since loading, what is returned is what was compiled."""
        try:
            tensors, shard.stat = read_checked(shard.path, shard.sha256, f"bank {self.name!r}: shard {shard.name}",
                                                "it changed on disk and its sha256 no longer matches the manifest")
        except FileNotFoundError:
            raise self._missing(shard) from None
        except OSError as exc:
            raise self._unreadable(shard, exc) from exc
        return tensors  # the same content (perhaps rewritten: an identical add, a restore, a touch)

    def _missing(self, shard: _Shard) -> BankError:
        if self._manifest_changed():  # e.g. `doc2atom bank remove` dropped it after swapping the manifest
            return BankError(f"bank {self.name!r} changed on disk while in use (shard {shard.name} is gone); "
                             "reload it", kind=BankErrorKind.STALE)
        return BankError(f"bank {self.name!r}: shard {shard.name} is missing")

    def _unreadable(self, shard: _Shard, exc: OSError) -> BankError:
        return BankError(f"bank {self.name!r}: shard {shard.name} cannot be read "
                         f"({exc.strerror or type(exc).__name__})")

    def _manifest_changed(self) -> bool:
        stat = stat_or_none(self.path / MANIFEST_NAME)
        return stat is None or stat != self._manifest_stat

    def _shard_no(self, index: int) -> int:
        if not 0 <= index < len(self.atoms):
            raise IndexError(f"atom index {index} outside bank of {len(self.atoms)} atoms")
        return bisect.bisect_right(self._starts, index) - 1

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for atom in self.atoms:
            counts[atom.type] = counts.get(atom.type, 0) + 1
        return {
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "base_model": self.spec.base_model.name,
            "documents": len(self._shards),
            "atoms": len(self.atoms),
            "atoms_per_type": counts,
            "targets": [t.key for t in self.spec.targets],
            "micro_rank": self.spec.micro_rank,
            "key_encoder": self.spec.key_encoder,
            "key_dim": self.spec.key_dim,
            "reranker": self.spec.reranker["name"] if self.spec.reranker else None,
        }

    # ---- writing -------------------------------------------------------------------------------

    def reranker_folders(self) -> list[Path]:
        return [self.path / RERANKER_FOLDER]

    def query_projection(self) -> np.ndarray | None:
        """The trained query projection stored with the bank, if any."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        file = self.path / QUERY_PROJECTION
        if not file.is_file():
            return None
        try:
            return load_file(str(file))["projection"]
        except (OSError, KeyError, SafetensorError) as exc:
            raise BankError(f"bank {self.name!r}: {QUERY_PROJECTION} is unreadable "
                            f"({type(exc).__name__})") from exc

    @classmethod
    def create(cls, path: str | os.PathLike, spec: BankSpec, documents: Iterable[DocumentAtoms],
               overwrite: bool = False, query_projection: np.ndarray | None = None,
               reranker: Path | None = None) -> AtomBank:
        """Write a new bank atomically: everything goes into a temp dir that is renamed into place.
        `reranker`: a reranker folder that is not shipped, copied into the bank (its spec names it)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise BankError(f"{path} already exists (pass overwrite=True to replace it)")
        with atomic_directory(path) as tmp:
            (tmp / SHARDS_DIR).mkdir()
            if query_projection is not None:
                from safetensors.numpy import save_file

                save_file({"projection": np.ascontiguousarray(query_projection, dtype=np.float32)},
                          str(tmp / QUERY_PROJECTION))
                make_readable(tmp / QUERY_PROJECTION)
            if reranker is not None:
                shutil.copytree(reranker, tmp / RERANKER_FOLDER)
            entries = [write_shard(tmp, spec, doc) for doc in documents]
            _check_unique_documents(entries)
            _write_manifest(tmp, spec, entries)
        logger.info("wrote atom bank %s", path)
        return cls.load(path)

    def add_documents(self, documents: Iterable[DocumentAtoms], replace: bool = False) -> AtomBank:
        """Add documents' atoms (new shards + one atomic manifest swap); existing shards are untouched."""
        entries = self._manifest_entries()
        new_entries = [write_shard(self.path, self.spec, doc) for doc in documents]
        new_ids = {e["id"] for e in new_entries}
        clashes = new_ids & {e["id"] for e in entries}
        if clashes and not replace:
            raise BankError(f"documents already in the bank: {sorted(clashes)} (pass replace=True)")
        entries = [e for e in entries if e["id"] not in new_ids] + new_entries
        _check_unique_documents(entries)
        return self._commit(entries)

    def remove_documents(self, document_ids: Iterable[str]) -> AtomBank:
        """Drop documents' atoms: one atomic manifest swap, then their shards are deleted."""
        drop = set(document_ids)
        missing = drop - set(self.document_ids)
        if missing:
            raise BankError(f"documents not in the bank: {sorted(missing)}", kind=BankErrorKind.NOT_FOUND)
        return self._commit([e for e in self._manifest_entries() if e["id"] not in drop])

    def _manifest_entries(self) -> list[dict[str, Any]]:
        return json.loads((self.path / MANIFEST_NAME).read_text())["documents"]

    def _commit(self, entries: list[dict[str, Any]]) -> AtomBank:
        _write_manifest(self.path, self.spec, entries)
        live = {(self.path / e["shard"]).name for e in entries}
        for shard in (self.path / SHARDS_DIR).glob("*.safetensors"):
            if shard.name not in live:
                shard.unlink(missing_ok=True)
        return AtomBank.load(self.path, name=self.name)


# ---- helpers -----------------------------------------------------------------------------------


def _check_unique_documents(entries: list[dict[str, Any]]) -> None:
    doc_ids = [e["id"] for e in entries]
    if len(set(doc_ids)) != len(doc_ids):
        raise BankError("the same document id appears twice")
    atom_ids = [a["id"] for e in entries for a in e["atoms"]]
    if len(set(atom_ids)) != len(atom_ids):
        raise BankError("atom ids must be unique across the bank")


def _write_manifest(bank: Path, spec: BankSpec, entries: list[dict[str, Any]]) -> None:
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "documents": entries,
    }
    atomic_write_text(bank / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
