"""A format-v2 bank's rows: its manifest's document table, how bank rows map onto segment rows, and the
lazy views the router reads — atom records parsed on access, keys read in blocks or by row.

Bank rows are the documents' atoms in manifest order. A document's atoms are consecutive rows of one segment,
so bank rows are a few *runs* of consecutive segment rows: one per commit for a bank built by create + adds,
one more per hole a removal left.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from .bank_interface import AtomRecord
from .bank_segments import Segment, SegmentInfo, id_hash, is_sha256
from .errors import BankError

RECORD_CACHE_SIZE = 4096


@dataclass
class DocumentTable:
    """A v2 manifest's documents, column-wise (row j = document j): no atom records, 5 values per document."""

    ids: list[str]
    shards: list[str]  # sha256 of each document's shard: shards/<sha256[:16]>.safetensors
    segment: np.ndarray  # int64 [D]: index into the manifest's segments
    row: np.ndarray  # int64 [D]: the document's first row within its segment
    atoms: np.ndarray  # int64 [D]

    COLUMNS = ("id", "shard_sha256", "segment", "row", "atoms")

    @classmethod
    def empty(cls) -> DocumentTable:
        return cls([], [], *(np.zeros(0, np.int64) for _ in range(3)))

    @classmethod
    def from_manifest(cls, data: Any, segments: Sequence[SegmentInfo]) -> DocumentTable:
        if not isinstance(data, dict) or set(data) != set(cls.COLUMNS):
            raise BankError(f"'documents' must be a table with columns {list(cls.COLUMNS)}")
        columns = [data[c] for c in cls.COLUMNS]
        if not all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
            raise BankError("'documents' columns must be lists of one length")
        ids, shas, *numbers = columns
        if not all(isinstance(i, str) and i for i in ids):
            raise BankError("document ids must be non-empty strings")
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise BankError(f"document {twice[:80]!r} listed twice")
        if not all(is_sha256(s) for s in shas):
            raise BankError("shard_sha256 values must be 64 lowercase hex digits")
        if not all(type(x) is int and x >= 0 for column in numbers for x in column):
            raise BankError("segment, row and atoms must be non-negative integers")
        table = cls(ids, shas, *(np.asarray(c, np.int64).reshape(-1) for c in numbers))
        table._check_rows(segments)
        return table

    def _check_rows(self, segments: Sequence[SegmentInfo]) -> None:
        """Every document inside its segment, no two documents sharing a row."""
        if len(self.ids) and self.segment.max() >= len(segments):
            raise BankError("a document names a segment the manifest does not list")
        sizes = np.asarray([s.rows for s in segments], np.int64)
        end = self.row + self.atoms
        if len(self.ids) and (end > sizes[self.segment]).any():
            j = int(np.argmax(end > sizes[self.segment]))
            raise BankError(f"document {self.ids[j][:80]!r}: rows {int(self.row[j])}..{int(end[j])} lie "
                            f"outside its segment of {int(sizes[self.segment[j]])} rows")
        order = np.lexsort((self.row, self.segment))
        seg, row, stop = self.segment[order], self.row[order], end[order]
        clash = (seg[1:] == seg[:-1]) & (row[1:] < stop[:-1])
        if clash.any():
            j = int(order[1:][np.argmax(clash)])
            raise BankError(f"document {self.ids[j][:80]!r} shares segment rows with another document")

    def to_manifest(self) -> dict[str, list]:
        return {"id": list(self.ids), "shard_sha256": list(self.shards), "segment": self.segment.tolist(),
                "row": self.row.tolist(), "atoms": self.atoms.tolist()}

    def take(self, keep: np.ndarray) -> DocumentTable:
        """The documents at the given positions (or boolean mask), in that order."""
        where = np.flatnonzero(keep) if keep.dtype == bool else keep
        return DocumentTable([self.ids[j] for j in where], [self.shards[j] for j in where],
                             self.segment[where], self.row[where], self.atoms[where])

    def concat(self, other: DocumentTable) -> DocumentTable:
        return DocumentTable(self.ids + other.ids, self.shards + other.shards,
                             np.concatenate([self.segment, other.segment]),
                             np.concatenate([self.row, other.row]), np.concatenate([self.atoms, other.atoms]))

    def starts(self) -> np.ndarray:
        """Bank row of each document's first atom, and the bank's size last: int64 [D + 1]."""
        return np.concatenate([[0], np.cumsum(self.atoms)]).astype(np.int64)

    def runs(self) -> RowRuns:
        return RowRuns.of(self)


@dataclass(frozen=True)
class RowRuns:
    """Bank rows [starts[j], starts[j+1]) are rows first[j].. of segment segment[j]."""

    starts: np.ndarray  # int64 [R + 1]
    segment: np.ndarray  # int64 [R]
    first: np.ndarray  # int64 [R]

    @classmethod
    def of(cls, table: DocumentTable) -> RowRuns:
        keep = table.atoms > 0
        seg, row, n = table.segment[keep], table.row[keep], table.atoms[keep]
        # A document continues the previous run when it follows it in the same segment.
        new = np.ones(len(seg), bool)
        new[1:] = (seg[1:] != seg[:-1]) | (row[1:] != row[:-1] + n[:-1])
        starts = np.concatenate([[0], np.cumsum(n)])
        return cls(starts[np.concatenate([new, [True]])].astype(np.int64), seg[new], row[new])

    def __len__(self) -> int:
        return len(self.segment)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """(segment, first segment row, rows) per run, in bank order."""
        for j in range(len(self.segment)):
            yield int(self.segment[j]), int(self.first[j]), int(self.starts[j + 1] - self.starts[j])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment, segment row) of each bank row."""
        run = np.searchsorted(self.starts, rows, side="right") - 1
        return self.segment[run], self.first[run] + rows - self.starts[run]

    def gather(self, per_segment: Sequence[np.ndarray]) -> np.ndarray:
        """Concatenate per-segment row arrays (e.g. gates) into bank row order (a view for a single run)."""
        parts = [per_segment[s][f: f + n] for s, f, n in self]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return per_segment[0][:0] if per_segment else np.zeros(0)
        return np.concatenate(parts)


class RecordSequence(Sequence[AtomRecord]):
    """A read-only Sequence of atom records that finds one record by row (`_at`): indexing, negative indices,
    slices and the IndexError are the same for a bank's lazy records and a union's chained ones."""

    what = "bank"  # for the IndexError's message

    def _at(self, row: int) -> AtomRecord:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> AtomRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[AtomRecord]: ...

    def __getitem__(self, index: int | slice) -> AtomRecord | list[AtomRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = int(index)
        row = row + len(self) if row < 0 else row
        if not 0 <= row < len(self):
            raise IndexError(f"atom index {index} outside {self.what} of {len(self)} atoms")
        return self._at(row)


class LazyAtoms(RecordSequence):
    """A v2 bank's atom records: a read-only Sequence that parses a record when it is accessed (a small LRU
    cache keeps the recently routed ones). Each record must name its row's document and hash to the id the
    segment recorded, or it is a BankError."""

    def __init__(self, segments: Sequence[Segment], runs: RowRuns, doc_ids: Sequence[str],
                 doc_starts: np.ndarray, cache_size: int = RECORD_CACHE_SIZE) -> None:
        self._segments, self._runs = segments, runs
        self._doc_ids, self._doc_starts = doc_ids, doc_starts
        self._cache: OrderedDict[int, AtomRecord] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._runs.starts[-1])

    def _at(self, row: int) -> AtomRecord:
        with self._lock:
            atom = self._cache.get(row)
            if atom is not None:
                self._cache.move_to_end(row)
                return atom
        seg, seg_row = (int(x[0]) for x in self._runs.locate(np.asarray([row])))
        atom = self._record(seg, seg_row, row, self._segments[seg].record(seg_row))
        with self._lock:
            self._cache[row] = atom
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return atom

    def __iter__(self) -> Iterator[AtomRecord]:
        """Every record in row order, read sequentially (not through the cache)."""
        for j, (seg, first, count) in enumerate(self._runs):
            row = int(self._runs.starts[j])
            for seg_row, data in self._segments[seg].records(first, count):
                yield self._record(seg, seg_row, row + seg_row - first, data)

    def _record(self, seg: int, seg_row: int, row: int, data: Any) -> AtomRecord:
        segment = self._segments[seg]
        where = f"{segment.prefix}records {segment.info.records_name} row {seg_row}"
        if not isinstance(data, dict):
            raise BankError(f"{where}: not an atom record")
        try:
            atom = AtomRecord.from_dict(data)
        except BankError as exc:
            raise BankError(f"{where}: {exc}") from exc
        document = self._doc_ids[int(np.searchsorted(self._doc_starts, row, side="right")) - 1]
        if atom.document_id != document:
            raise BankError(f"{where}: atom {atom.id[:80]!r} names document {atom.document_id[:80]!r}, but "
                            f"the manifest places it in {document[:80]!r}")
        if id_hash(atom.id) != int(segment.id_hashes[seg_row]):
            raise BankError(f"{where}: atom id {atom.id[:80]!r} does not match the segment")
        return atom


class SegmentKeys:
    """A v2 bank's keys as a KeySource (key_index.py): read in blocks to build an index, by row to
    re-score."""

    def __init__(self, segments: Sequence[Segment], runs: RowRuns, dim: int) -> None:
        self._segments, self._runs, self.dim = segments, runs, dim

    def __len__(self) -> int:
        return int(self._runs.starts[-1])

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        size = 0
        for seg, first, count in self._runs:
            for block in self._segments[seg].key_chunks(first, count, rows):
                pending.append(block)
                size += len(block)
                if size >= rows:  # coalesce small runs into blocks of about `rows` rows
                    yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                    pending, size = [], 0
        if pending:
            yield np.concatenate(pending) if len(pending) > 1 else pending[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        segs, seg_rows = self._runs.locate(rows)
        for seg in np.unique(segs):
            picked = np.flatnonzero(segs == seg)
            order = picked[np.argsort(seg_rows[picked])]  # file order
            out[order] = self._segments[int(seg)].key_rows(seg_rows[order])
        return out

    def array(self) -> np.ndarray:
        """Every key in row order, in memory: float32 [N, dim]."""
        blocks = list(self.chunks(1 << 16))
        return np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float32)
