"""Atom bank: a directory whose manifest.json is the commit point. Format v2 (written by this build):

    BANK/
      manifest.json                 spec (base model, targets, rank, key encoder), the segments
                                    [{sha256, records_sha256, rows}] and the documents as one table of
                                    columns {id, shard_sha256, segment, row, atoms}: document j's atoms are
                                    rows row[j] .. row[j] + atoms[j] - 1 of segment segment[j]
      shards/<sha256[:16]>.safetensors     one document's stacked tensors, row i = the document's atom i:
                                    A.<layer>.<module>  [n, r, in]    micro-LoRA down factors
                                    B.<layer>.<module>  [n, out, r]   micro-LoRA up factors
                                    gates [n, T], keys [n, key_dim]   (as in v1; v2 routes with the segment's)
      segments/<sha256[:16]>.safetensors   what one commit wrote for routing (bank_segments.py):
                                    keys [n, key_dim], gates [n, T], record offsets, atom-id hashes
      segments/<sha256[:16]>.jsonl         its atom records, one AtomRecord JSON object per line
      index/<sha256[:16]>.safetensors      optional: the stage-1 IVF index of a bank of more than 50k atoms,
                                    stored at every commit so that a server need not build it (bank_index.py)
      query_projection.safetensors  optional `projection` [d_text, key_dim] of a trained query encoder
      reranker/                     optional: the bank's own copy of a reranker that doc2atom does not ship

Bank rows are the documents' atoms in manifest order. Loading reads the manifest and streams each segment
once (sha256, finiteness; gates, record offsets and id hashes stay in memory: 24 + 4·T bytes per atom), so
it costs O(atoms × key_dim) and never reads a shard. Atom records are parsed when accessed (`atoms` is a lazy
Sequence); keys are read back from the segments when the router builds its index (`key_source`). Every read
of a shard's factors checks its bytes against the manifest's sha256 (the first read also its tensors, shapes
and values), so a damaged shard is a BankError for the atoms it holds, when they are composed; a damaged
segment, at load.

Adding documents writes their shards and one new segment, then atomically replaces the manifest; removing
one drops it from the manifest (its segment rows become unreachable), then deletes its shard and any segment
no document references. Other files are never touched. Nothing is pickled: safetensors, JSON, JSON lines.

Format v1 (read only: bank_v1.py) kept every atom record in the manifest and keys and gates only in the
shards, so its load reads every shard; `doc2atom bank upgrade` turns it into v2 without rewriting a shard.
Error messages name the bank by its `name` and files relative to the bank.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import bank_index, bank_writer
from .bank_interface import AtomRecord, BankSpec, DocumentAtoms, Target
from .bank_manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    file_error,
    read_manifest,
    write_manifest,
)
from .bank_rows import DocumentTable, LazyAtoms, SegmentKeys
from .bank_segments import Segment, SegmentInfo
from .bank_v1 import read_v1
from .errors import BankError, BankErrorKind
from .files import atomic_directory, make_readable
from .fingerprint import BaseModelFingerprint
from .key_index import ArrayKeys, KeyIndex, KeyIndexConfig, KeySource
from .shard_files import SHARDS_DIR, StatKey, check_tensors, read_checked, shard_name, stat_key, stat_or_none

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["AtomBank", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "QUERY_PROJECTION",
           "RERANKER_FOLDER"]

QUERY_PROJECTION = "query_projection.safetensors"  # optional: maps the sentence encoder into the key space
RERANKER_FOLDER = "reranker"  # optional: the bank's own copy of a reranker that is not shipped with doc2atom


class AtomBank:
    """A loaded, validated atom bank. Gates are in memory; keys, records (v2) and factors are read when
    needed."""

    def __init__(self, path: Path, spec: BankSpec, *, version: int, fingerprint: str,
                 manifest_stat: StatKey | None, name: str, doc_ids: list[str], shard_shas: list[str],
                 doc_starts: np.ndarray, atoms: Sequence[AtomRecord], gates: np.ndarray,
                 keys: np.ndarray | None = None, shard_names: list[str] | None = None,
                 shard_stats: dict[int, StatKey | None] | None = None, segments: list[Segment] | None = None,
                 table: DocumentTable | None = None, verified: bool = True,
                 stored_index: bank_index.StoredIndexInfo | None = None) -> None:
        self.path = path
        self.name = name  # how messages name the bank (a server: the request's)
        self.spec = spec
        self.format_version = version
        self.fingerprint = fingerprint  # sha256 of the manifest: changes with any change of content
        self.atoms = atoms  # v1: a list; v2: LazyAtoms
        self.gates = gates  # [N, T] float32
        self._keys = keys  # v1: [N, key_dim] float32; v2: read from the segments when first asked for
        self._doc_ids, self._shard_shas, self._doc_starts = doc_ids, shard_shas, doc_starts
        self._shard_names = shard_names  # v1 only: as the manifest names them (v2: from the sha256)
        # document -> stat of its shard when last verified (None: the last read failed). v1: every shard (read
        # at load); v2: the shards read since, whose first read also checked their tensors.
        self._shard_stats: dict[int, StatKey | None] = dict(shard_stats or {})
        self._segments = segments or []
        self._table = table
        self._verified = verified
        self._manifest_stat = manifest_stat  # None: unknown, so any missing file counts as a manifest change
        self.stored_index = stored_index  # v2: the manifest's stored stage-1 index, if any

    def __len__(self) -> int:
        return int(self._doc_starts[-1])

    def __repr__(self) -> str:
        return f"AtomBank({self.name!r}, atoms={len(self)}, documents={len(self._doc_ids)})"

    @property
    def document_ids(self) -> list[str]:
        return list(self._doc_ids)

    @property
    def keys(self) -> np.ndarray:
        """[N, key_dim] float32, in memory (v2: read from the segments on first use; the router does not need
        this: it builds its index from `key_source()` in blocks)."""
        if self._keys is None:
            self._keys = self.key_source().array()  # type: ignore[union-attr]
        return self._keys

    def key_source(self) -> KeySource:
        if self.format_version == 1 or self._keys is not None:
            return ArrayKeys(self.keys)
        return SegmentKeys(self._segments, self._table.runs(), self.spec.key_dim)  # type: ignore[union-attr]

    def stored_key_index(self, config: KeyIndexConfig) -> KeyIndex | None:
        """The stage-1 index stored with the bank, when `config` would build that very index over its rows
        (else None: build one). Raises BankError kind "invalid" for a damaged or unreadable index file
        ("stale" when it is gone because the bank changed)."""
        info = self.stored_index
        if info is None or info.rows != len(self):
            return None
        prefix = f"bank {self.name!r}: "
        try:
            return bank_index.read_index(self.path, info, self.key_source(), config, prefix)
        except OSError as exc:
            raise file_error(self.path, self._manifest_stat, prefix, f"index {info.name}", exc) from exc

    # ---- reading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, expect_base: BaseModelFingerprint | None = None,
             verify: bool = True, name: str | None = None,
             trusted: dict[str, StatKey] | None = None) -> AtomBank:
        """Load and validate a bank. `verify`: also hash what load reads (v2: the segments; v1: every shard)
        and check every value finite. `trusted`: file -> stat of bytes this process has verified already.

        Every error is a BankError that names the bank as `name` (default: its path) and its files relative
        to it: a server passes the request's bank name so that no message reveals where banks live on disk.
        """
        path = Path(path)
        label = str(path) if name is None else name
        prefix = f"bank {label!r}: "
        try:
            return cls._load(path, expect_base, verify, label, trusted or {})
        except BankError as exc:
            message = str(exc)
            message = message if message.startswith(prefix) else prefix + message
            raise BankError(message, kind=exc.kind) from exc
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # A manifest shaped in a way no check above foresaw: still the bank's fault, not a server error.
            logger.warning("bank %s: unexpected %s while loading: %s", path, type(exc).__name__, exc)
            raise BankError(f"{prefix}malformed manifest ({type(exc).__name__})") from exc

    @classmethod
    def _load(cls, path: Path, expect_base: BaseModelFingerprint | None, verify: bool, label: str,
              trusted: dict[str, StatKey]) -> AtomBank:
        manifest, fingerprint, manifest_stat = read_manifest(path)
        version = manifest["format_version"]
        spec = BankSpec.from_dict(manifest.get("spec") or {})
        if expect_base is not None:
            diffs = spec.base_model.differences(expect_base)
            if diffs:
                raise BankError(
                    f"compiled for base model {spec.base_model.name!r}, which does not match the "
                    f"served model {expect_base.name!r}: " + "; ".join(diffs), kind=BankErrorKind.MISMATCH)
        common = dict(version=version, fingerprint=fingerprint, manifest_stat=manifest_stat, name=label,
                      verified=verify)
        if version == 1:
            def changed() -> bool:
                return stat_or_none(path / MANIFEST_NAME) != manifest_stat

            v1 = read_v1(path, manifest, spec, verify, changed)
            starts = np.concatenate([[0], np.cumsum(v1.counts, dtype=np.int64)]).astype(np.int64)
            return cls(path, spec, doc_ids=v1.doc_ids, shard_shas=v1.shard_shas, doc_starts=starts,
                       atoms=v1.atoms, gates=v1.gates, keys=v1.keys,  # type: ignore[arg-type]
                       shard_names=v1.shard_names, shard_stats=dict(enumerate(v1.stats)),
                       **common)  # type: ignore[arg-type]
        return cls._load_v2(path, manifest, spec, verify, trusted, common)

    @classmethod
    def _load_v2(cls, path: Path, manifest: dict[str, Any], spec: BankSpec, verify: bool,
                 trusted: dict[str, StatKey], common: dict[str, Any]) -> AtomBank:
        listed = manifest.get("segments")
        if not isinstance(listed, list):
            raise BankError(f"{MANIFEST_NAME}: 'segments' must be a list")
        infos = [SegmentInfo.from_dict(s) for s in listed]
        if len({s.sha256[:16] for s in infos}) != len(infos):
            raise BankError(f"{MANIFEST_NAME}: a segment is listed twice")
        table = DocumentTable.from_manifest(manifest.get("documents"), infos)
        prefix = f"bank {common['name']!r}: "

        def errors(label: str, exc: OSError) -> BankError:
            return file_error(path, common["manifest_stat"], prefix, label, exc)

        segments = [Segment.open(path, info, spec.key_dim, len(spec.targets), verify, prefix, errors, trusted)
                    for info in infos]
        runs, starts = table.runs(), table.starts()
        gates = runs.gather([s.gates for s in segments]) if len(runs) else \
            np.zeros((0, len(spec.targets)), np.float32)
        atoms = LazyAtoms(segments, runs, table.ids, starts)
        if len(runs):
            _check_unique_ids(runs.gather([s.id_hashes for s in segments]), atoms)
        index = manifest.get("index")
        stored = None if index is None else bank_index.StoredIndexInfo.from_dict(index)
        return cls(path, spec, doc_ids=table.ids, shard_shas=table.shards, doc_starts=starts, atoms=atoms,
                   gates=gates, segments=segments, table=table, stored_index=stored, **common)

    def factors(self, indices: Sequence[int]) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
        """Micro-LoRA factors of the given atoms: target -> (A [k, r, in], B [k, out, r]), float32.

        Every shard read is checked against the manifest's sha256 (see `_read_verified`): a shard that is
        gone because the bank changed raises BankError kind "stale" (reload the bank and retry); a missing,
        truncated, changed or malformed one, kind "invalid".
        """
        import torch

        if not indices:
            raise ValueError("no atoms selected")
        rows: dict[str, list[torch.Tensor]] = {}
        by_doc: dict[int, list[tuple[int, int]]] = {}  # document no. -> [(position in output, row)]
        for pos, i in enumerate(indices):
            doc = self._doc_no(i)
            by_doc.setdefault(doc, []).append((pos, i - int(self._doc_starts[doc])))
        for doc, picks in by_doc.items():
            tensors = self._read_verified(doc)
            for name in (f"{ab}.{t.key}" for t in self.spec.targets for ab in "AB"):
                column = rows.setdefault(name, [None] * len(indices))  # type: ignore[list-item]
                for pos, row in picks:
                    column[pos] = tensors[name][row : row + 1]
        return {t: (torch.cat(rows[f"A.{t.key}"]).float(), torch.cat(rows[f"B.{t.key}"]).float())
                for t in self.spec.targets}

    def check_files(self, shards: bool = True) -> None:
        """Is the bank on disk still the one loaded? Stats the manifest; with `shards`, also the segments and
        the shards, re-hashing only files whose stat changed since they were verified (v1: every shard; v2:
        the shards read since loading, so the cost follows use, not the bank's size). Raises BankError kind
        "stale" when the manifest changed (reload the bank), kind "invalid" when a file is missing,
        unreadable or no longer matches."""
        if self._manifest_changed():
            raise BankError(f"bank {self.name!r} changed on disk; reload it", kind=BankErrorKind.STALE)
        if not shards:
            return
        for segment in self._segments:
            for which in ("segment", "records"):
                if segment.stat_changed(which):
                    segment.recheck(which)
        for doc, known in sorted(self._shard_stats.items()):
            try:
                stat = stat_key(os.stat(self.path / self._shard_name(doc)))
            except FileNotFoundError:
                raise self._missing(doc) from None
            except OSError as exc:
                raise self._unreadable(doc, exc) from exc
            if stat != known:
                self._read_verified(doc)

    def bank_name_of(self, index: int) -> str:
        """Every atom comes from this bank (a BankUnion answers per member)."""
        self._doc_no(index)  # the same IndexError as a union's
        return self.name

    def shard_label(self, index: int) -> str:
        """Which file holds an atom's factors, for messages: "shard shards/<sha>.safetensors"."""
        return f"shard {self._shard_name(self._doc_no(index))}"

    def _shard_name(self, doc: int) -> str:
        return self._shard_names[doc] if self._shard_names is not None else shard_name(self._shard_shas[doc])

    def _read_verified(self, doc: int) -> dict[str, torch.Tensor]:
        """A shard's tensors, read whole and checked against the manifest's sha256 (about a millisecond
        per MB): whatever happened to the file since loading, what is returned is what was compiled."""
        name = self._shard_name(doc)
        label = f"bank {self.name!r}: shard {name}"
        known = self._shard_stats.get(doc) is not None
        why = "it changed on disk and its sha256 no longer matches the manifest" if known else \
            "its sha256 does not match the manifest"
        try:
            tensors, stat = read_checked(self.path / name, self._shard_shas[doc], label, why)
            if not known and self.format_version >= 2:  # load never read it: check what it holds, once
                self._check_shard(doc, tensors, label)
        except FileNotFoundError:
            self._shard_stats[doc] = None
            raise self._missing(doc) from None
        except OSError as exc:
            self._shard_stats[doc] = None
            raise self._unreadable(doc, exc) from exc
        except BankError:
            self._shard_stats[doc] = None
            raise
        self._shard_stats[doc] = stat
        return tensors  # the same content (perhaps rewritten: an identical add, a restore, a touch)

    def _check_shard(self, doc: int, tensors: dict[str, torch.Tensor], label: str) -> None:
        start, end = int(self._doc_starts[doc]), int(self._doc_starts[doc + 1])
        _, gates = check_tensors(tensors, label, self.spec, end - start, full=True)
        if not np.array_equal(gates, self.gates[start:end]):
            raise BankError(f"{label}: its gates differ from the segment's (the manifest pairs it with other "
                            "rows)")

    def _missing(self, doc: int) -> BankError:
        name = self._shard_name(doc)
        if self._manifest_changed():  # e.g. `doc2atom bank remove` dropped it after swapping the manifest
            return BankError(f"bank {self.name!r} changed on disk while in use (shard {name} is gone); "
                             "reload it", kind=BankErrorKind.STALE)
        return BankError(f"bank {self.name!r}: shard {name} is missing")

    def _unreadable(self, doc: int, exc: OSError) -> BankError:
        return BankError(f"bank {self.name!r}: shard {self._shard_name(doc)} cannot be read "
                         f"({exc.strerror or type(exc).__name__})")

    def _manifest_changed(self) -> bool:
        stat = stat_or_none(self.path / MANIFEST_NAME)
        return stat is None or stat != self._manifest_stat

    def _doc_no(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"atom index {index} outside bank of {len(self)} atoms")
        return int(np.searchsorted(self._doc_starts, index, side="right")) - 1

    def summary(self) -> dict[str, Any]:
        """What `doc2atom bank info` prints. Counting atom types reads every record (v2: seconds per
        million)."""
        counts: dict[str, int] = {}
        for atom in self.atoms:
            counts[atom.type] = counts.get(atom.type, 0) + 1
        return {
            "path": str(self.path),
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "base_model": self.spec.base_model.name,
            "documents": len(self._doc_ids),
            "atoms": len(self),
            "segments": len(self._segments),
            "atoms_per_type": counts,
            "targets": [t.key for t in self.spec.targets],
            "micro_rank": self.spec.micro_rank,
            "key_encoder": self.spec.key_encoder,
            "key_dim": self.spec.key_dim,
            "reranker": self.spec.reranker["name"] if self.spec.reranker else None,
        }

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

    # ---- writing (always format v2) ------------------------------------------------------------

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
            written = bank_writer.write_documents(tmp, spec, documents)
            segments, table = bank_writer.merge([], DocumentTable.empty(), written)
            index = bank_writer.write_stored_index(tmp, spec, segments, table)
            write_manifest(tmp, spec, segments, table, index)
        logger.info("wrote atom bank %s", path)
        return cls.load(path)

    def add_documents(self, documents: Iterable[DocumentAtoms], replace: bool = False) -> AtomBank:
        """Add documents' atoms (their shards, one new segment, one atomic manifest swap); nothing else is
        touched. The bank on disk is read again first (a v1 bank is upgraded to v2)."""
        return bank_writer.add_documents(self, documents, replace)

    def remove_documents(self, document_ids: Iterable[str]) -> AtomBank:
        """Drop documents' atoms: one atomic manifest swap, then their shards (and segments no document
        references any more) are deleted."""
        return bank_writer.remove_documents(self, document_ids)

    def upgrade(self) -> AtomBank:
        """Rewrite a v1 bank as v2 without touching its shards (a v2 bank is returned as it is)."""
        return bank_writer.upgrade(self)

    # ---- for bank_writer -----------------------------------------------------------------------

    @property
    def verified(self) -> bool:
        return self._verified

    @property
    def table(self) -> DocumentTable | None:
        """v2: the manifest's document table."""
        return self._table

    @property
    def segments(self) -> list[Segment]:
        return self._segments

    @property
    def shard_shas(self) -> list[str]:
        return list(self._shard_shas)

    def shard_file(self, doc: int) -> str:
        """Document `doc`'s shard, relative to the bank."""
        return self._shard_name(doc)

    def document_atoms(self, doc: int) -> int:
        return int(self._doc_starts[doc + 1] - self._doc_starts[doc])


def _check_unique_ids(hashes: np.ndarray, atoms: Sequence[AtomRecord]) -> None:
    """Atom ids unique: compared as 64-bit hashes; only rows whose hashes collide are read to tell."""
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    for j in same[:100]:
        a, b = atoms[int(order[j])], atoms[int(order[j + 1])]
        if a.id == b.id:
            raise BankError(f"{MANIFEST_NAME}: atom id {a.id!r} is not unique")
