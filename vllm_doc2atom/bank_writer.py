"""Writing format-v2 banks (AtomBank's write half): documents -> their shards + one segment; then a new
manifest, the commit point; then the files that no document references any more are deleted — only the files
the commit dropped are looked at, never a listing of the bank. Every file is written under a temp name and
renamed into place, so readers see the old bank or the new one."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import bank_index
from .bank_index import StoredIndexInfo
from .bank_interface import AtomRecord, BankSpec, DocumentAtoms
from .bank_manifest import FORMAT_VERSION, file_error, write_manifest
from .bank_rows import DocumentTable, SegmentKeys
from .bank_segment_writer import SegmentWriter
from .bank_segments import Segment, SegmentInfo
from .errors import BankError, BankErrorKind
from .files import atomic_file
from .shard_files import StatKey, shard_name, stat_key, write_shard

logger = logging.getLogger(__name__)


class AtomBank(Protocol):
    """What the edits read of a loaded bank (bank.AtomBank; not imported: bank.py imports this module)."""

    path: Path
    name: str
    spec: BankSpec
    format_version: int
    verified: bool
    table: DocumentTable | None
    segments: list[Segment]
    stored_index: StoredIndexInfo | None
    shard_shas: list[str]
    document_ids: list[str]
    keys: np.ndarray
    gates: np.ndarray
    atoms: Sequence[AtomRecord]

    @classmethod
    def load(cls, path: Any, expect_base: Any = None, verify: bool = True, name: str | None = None,
             trusted: dict[str, StatKey] | None = None) -> AtomBank: ...

    def __len__(self) -> int: ...

    def shard_file(self, doc: int) -> str: ...

    def document_atoms(self, doc: int) -> int: ...


@dataclass
class Written:
    """Documents just written: their table (segment column: -1 = the new segment) and the new segment."""

    table: DocumentTable
    segment: SegmentInfo | None
    hashes: np.ndarray  # id hash of every new atom, in row order
    trusted: dict[str, StatKey] = field(default_factory=dict)  # our own new files, as we wrote them


def write_documents(bank: Path, spec: BankSpec, documents: Iterable[DocumentAtoms]) -> Written:
    """Each document's shard, and one segment for all of them. Document ids and atom ids must be unique among
    `documents` (if not, shards already written stay: content-addressed, unreferenced, harmless)."""
    ids, shas, rows, counts = [], [], [], []
    doc_ids: set[str] = set()
    atom_ids: set[str] = set()
    with SegmentWriter(bank, spec.key_dim, len(spec.targets)) as writer:
        for doc in documents:
            if doc.document_id in doc_ids or not doc.document_id:
                raise BankError(f"document id {doc.document_id[:80]!r} is empty or appears twice")
            doc_ids.add(doc.document_id)
            for atom in doc.atoms:
                if atom.id in atom_ids:
                    raise BankError(f"atom id {atom.id[:80]!r} appears twice: atom ids must be unique")
                atom_ids.add(atom.id)
            shas.append(write_shard(bank, spec, doc))  # validates the document first
            keys = doc.tensors["keys"].detach().float().cpu().numpy()
            gates = doc.tensors["gates"].detach().float().cpu().numpy()
            rows.append(writer.add(keys, gates, doc.atoms))
            ids.append(doc.document_id)
            counts.append(len(doc.atoms))
        info = writer.finish()
        hashes = writer.hashes
    trusted = {} if info is None else {n: stat_key(os.stat(bank / n)) for n in (info.name, info.records_name)}
    table = DocumentTable(ids, shas, np.full(len(ids), -1, np.int64), np.asarray(rows, np.int64),
                          np.asarray(counts, np.int64))
    return Written(table, info, hashes, trusted)


def merge(segments: Sequence[SegmentInfo], kept: DocumentTable,
          written: Written) -> tuple[list[SegmentInfo], DocumentTable]:
    """The kept documents, then the written ones, over the segments they still reference (in order)."""
    segments = list(segments)
    new = written.table
    if written.segment is not None:
        known = [s.sha256 for s in segments]
        at = known.index(written.segment.sha256) if written.segment.sha256 in known else len(segments)
        segments = segments if at < len(segments) else segments + [written.segment]
        new = DocumentTable(new.ids, new.shards, np.full(len(new.ids), at, np.int64), new.row, new.atoms)
    return prune(segments, kept.concat(new))


def prune(segments: Sequence[SegmentInfo], table: DocumentTable) -> tuple[list[SegmentInfo], DocumentTable]:
    """Drop the segments no document references; renumber the table's segment column."""
    used = np.unique(table.segment)
    remap = np.full(len(segments), -1, np.int64)
    remap[used] = np.arange(len(used))
    table = DocumentTable(table.ids, table.shards, remap[table.segment], table.row, table.atoms)
    return [segments[int(i)] for i in used], table


def delete_unreferenced(bank: Path, old_segments: Iterable[SegmentInfo], old_shards: Iterable[str],
                        segments: Sequence[SegmentInfo], table: DocumentTable) -> None:
    """After the manifest swap: delete the given segments and shards unless the new manifest references
    them."""
    live = {s.sha256 for s in segments}
    for info in old_segments:
        if info.sha256 not in live:
            for name in (info.name, info.records_name):
                (bank / name).unlink(missing_ok=True)
    for sha in set(old_shards) - set(table.shards):
        (bank / shard_name(sha)).unlink(missing_ok=True)


def write_stored_index(bank: Path, spec: BankSpec, segments: Sequence[SegmentInfo], table: DocumentTable,
                       opened: Sequence[Segment] = ()) -> StoredIndexInfo | None:
    """Before a manifest swap: store the stage-1 index of the bank as it will be, if it has more live rows
    than an exact index holds (bank_index.py); its keys are read from the segments (`opened`: those open
    already)."""
    if int(np.sum(table.atoms)) <= bank_index.CONFIG.exact_max:
        return None
    prefix = f"bank {bank.name!r}: "

    def errors(label: str, exc: OSError) -> BankError:
        return file_error(bank, None, prefix, label, exc)

    known = {s.info.sha256: s for s in opened}
    live = [known.get(info.sha256) or Segment.open(bank, info, spec.key_dim, len(spec.targets), False, prefix,
                                                   errors) for info in segments]
    return bank_index.write_index(bank, SegmentKeys(live, table.runs(), spec.key_dim))


def delete_old_index(bank: Path, old: StoredIndexInfo | None, new: StoredIndexInfo | None) -> None:
    """After the manifest swap: the index the old manifest listed, unless the new one lists it too."""
    if old is not None and (new is None or new.sha256 != old.sha256):
        (bank / old.name).unlink(missing_ok=True)


# ---- AtomBank's edits ----------------------------------------------------------------------------------


def add_documents(bank: AtomBank, documents: Iterable[DocumentAtoms], replace: bool) -> AtomBank:
    current = _current(bank)
    table, infos = current.table, [s.info for s in current.segments]
    assert table is not None
    written = write_documents(bank.path, bank.spec, documents)
    try:
        new_ids = set(written.table.ids)
        clashes = new_ids & set(table.ids)
        if clashes and not replace:
            raise BankError(f"documents already in the bank: {sorted(clashes)[:20]} (pass replace=True)")
        kept = table.take(np.asarray([d not in new_ids for d in table.ids], bool))
        _check_new_atom_ids(current, kept, written)
    except BaseException:  # nothing committed: remove what only this call wrote
        delete_unreferenced(bank.path, [written.segment] if written.segment else [], written.table.shards,
                            infos, table)
        raise
    segments, merged = merge(infos, kept, written)
    return _commit(bank, current, segments, merged, {**_trusted(bank), **written.trusted})


def remove_documents(bank: AtomBank, document_ids: Iterable[str]) -> AtomBank:
    drop = set(document_ids)
    current = _current(bank)
    table = current.table
    assert table is not None
    missing = drop - set(table.ids)
    if missing:
        raise BankError(f"documents not in the bank: {sorted(missing)[:20]}", kind=BankErrorKind.NOT_FOUND)
    segments, kept = prune([s.info for s in current.segments],
                           table.take(np.asarray([d not in drop for d in table.ids], bool)))
    return _commit(bank, current, segments, kept, _trusted(bank))


def upgrade(bank: AtomBank) -> AtomBank:
    """v1 -> v2: one segment from the records, keys and gates that a verified load read from the shards, then
    the manifest swap. Shards stay as they are (one whose v1 name is not its hash is copied to that name)."""
    if bank.format_version != 1:
        return bank
    if not bank.verified:
        bank = type(bank).load(bank.path, name=bank.name)
    starts = np.concatenate([[0], np.cumsum([bank.document_atoms(d) for d in range(len(bank.document_ids))])])
    rows = []
    with SegmentWriter(bank.path, bank.spec.key_dim, len(bank.spec.targets)) as writer:
        for start, end in zip(starts[:-1], starts[1:]):
            rows.append(writer.add(bank.keys[start:end], bank.gates[start:end], bank.atoms[start:end]))
        info = writer.finish()
    shas = bank.shard_shas
    renamed = [(bank.shard_file(d), shard_name(sha)) for d, sha in enumerate(shas) if bank.shard_file(d) !=
               shard_name(sha)]
    for old, new in renamed:
        with atomic_file(bank.path / new) as tmp:
            shutil.copyfile(bank.path / old, tmp)
    table = DocumentTable(bank.document_ids, list(shas), np.zeros(len(shas), np.int64),
                          np.asarray(rows, np.int64), np.diff(starts).astype(np.int64))
    segments = [info] if info is not None else []
    index = write_stored_index(bank.path, bank.spec, segments, table)
    write_manifest(bank.path, bank.spec, segments, table, index)
    for old, _ in renamed:
        (bank.path / old).unlink(missing_ok=True)
    logger.info("upgraded bank %s to format v%d (%d atoms)", bank.name, FORMAT_VERSION, len(bank))
    return type(bank).load(bank.path, name=bank.name)


def _current(bank: AtomBank) -> AtomBank:
    """The bank as it is on disk now, as v2 (what add and remove change): its manifest and segment headers."""
    current = type(bank).load(bank.path, verify=False, name=bank.name)
    return current if current.format_version != 1 else upgrade(current)


def _trusted(bank: AtomBank) -> dict[str, StatKey]:
    """Segment files `bank` verified, with their stats: a reload need not hash them again."""
    out = {}
    for segment in bank.segments:
        for which, name in (("segment", segment.info.name), ("records", segment.info.records_name)):
            stat = segment.verified_stat(which)
            if stat is not None:
                out[name] = stat
    return out


def _check_new_atom_ids(current: AtomBank, kept: DocumentTable, written: Written) -> None:
    """New atom ids must not repeat a kept document's: compared as 64-bit hashes; records are read only where
    two hashes match."""
    if written.segment is None or not len(written.hashes) or not len(kept.ids):
        return
    runs = kept.runs()
    old = runs.gather([s.id_hashes for s in current.segments]) if len(runs) else np.zeros(0, np.int64)
    common = np.intersect1d(old, written.hashes)
    if not len(common):
        return
    prefix = f"bank {current.name!r}: "
    new = Segment.open(current.path, written.segment, current.spec.key_dim, len(current.spec.targets), False,
                       prefix, lambda label, exc: file_error(current.path, None, prefix, label, exc),
                       written.trusted)
    colliding = set(common.tolist())
    new_ids = {data.get("id") for row, data in new.records(0, new.info.rows)
               if int(new.id_hashes[row]) in colliding}
    for row in np.flatnonzero(np.isin(old, common)):
        segment, segment_row = (int(x[0]) for x in runs.locate(np.asarray([row])))
        atom_id = current.segments[segment].record(segment_row).get("id")
        if atom_id in new_ids:
            raise BankError(f"atom id {str(atom_id)[:80]!r} is already in the bank: atom ids must be unique "
                            "across the bank")


def _commit(bank: AtomBank, current: AtomBank, segments: list[SegmentInfo], table: DocumentTable,
            trusted: dict[str, StatKey]) -> AtomBank:
    index = write_stored_index(bank.path, bank.spec, segments, table, current.segments)
    write_manifest(bank.path, bank.spec, segments, table, index)
    delete_unreferenced(bank.path, [s.info for s in current.segments], current.shard_shas, segments, table)
    delete_old_index(bank.path, current.stored_index, index)
    return type(bank).load(bank.path, name=bank.name, trusted=trusted)
