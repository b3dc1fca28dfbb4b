"""Segment files of a format-v2 atom bank: what one commit (create / add) wrote for routing, without factors;
their layout, and reading them (`bank_segment_writer` writes them).

    segments/<sha256[:16]>.safetensors  record_offsets [n+1] int64   byte offset of row i's record (.jsonl)
                                        id_hashes  [n] int64           blake2b-64 of each atom id (uniqueness)
                                        keys       [n, key_dim] float32
                                        gates      [n, T] float32      columns in spec.targets order
    segments/<sha256[:16]>.jsonl        one `AtomRecord.to_dict()` JSON object per line, in row order

Both are named after the safetensors file's sha256; the manifest holds it and the .jsonl's. Nothing is
memory-mapped (a file truncated under an mmap kills the whole server with SIGBUS): loading streams a segment
once — hash, finiteness, and the small tensors kept in memory (24 + 4·T bytes per atom) — while keys are read
again with plain reads when an index is built or candidates are re-scored, and records one line at a time.
Every such read first compares the file's fstat with that of the bytes last verified and re-hashes the file
when it changed, as shards are checked; a file that no longer matches is a BankError, never bad data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import BankError
from .shard_files import StatKey, stat_key

logger = logging.getLogger(__name__)

SEGMENTS_DIR = "segments"
SEGMENT_FORMAT = "doc2atom-segment"
MAX_HEADER_BYTES = 1 << 20
CHUNK_BYTES = 16 << 20  # streaming reads and copies
_HEX64 = re.compile(r"[0-9a-f]{64}")
DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}
_SMALL = ("record_offsets", "id_hashes", "gates")  # kept in memory; `keys` stays on disk
# An OSError while reading a bank file (relative name) -> the BankError to raise (the bank knows whether its
# manifest changed meanwhile: "stale" rather than "invalid").
FileErrors = Callable[[str, OSError], BankError]


def id_hash(atom_id: str) -> int:
    """64-bit hash of an atom id: uniqueness is checked on these numbers, not on a million strings."""
    return int.from_bytes(hashlib.blake2b(atom_id.encode(), digest_size=8).digest(), "little", signed=True)


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


@dataclass(frozen=True)
class SegmentInfo:
    """A segment as the manifest lists it."""

    sha256: str  # of the .safetensors file; names both files
    records_sha256: str  # of the .jsonl file
    rows: int

    @property
    def name(self) -> str:
        return f"{SEGMENTS_DIR}/{self.sha256[:16]}.safetensors"

    @property
    def records_name(self) -> str:
        return f"{SEGMENTS_DIR}/{self.sha256[:16]}.jsonl"

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "records_sha256": self.records_sha256, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: Any) -> SegmentInfo:
        ok = isinstance(data, dict) and all(is_sha256(data.get(k)) for k in ("sha256", "records_sha256"))
        rows = data.get("rows") if isinstance(data, dict) else None
        if not ok or type(rows) is not int or rows < 0:
            raise BankError(f"malformed segment entry {str(data)[:120]}")
        return cls(data["sha256"], data["records_sha256"], rows)


@dataclass(frozen=True)
class _Layout:
    data_start: int  # file offset of the data section
    regions: dict[str, tuple[int, int]]  # tensor -> [start, end) within the data section
    size: int  # expected file size


class Segment:
    """One segment of a loaded bank: its small tensors in memory, keys and records read on demand."""

    def __init__(self, bank: Path, info: SegmentInfo, key_dim: int, num_targets: int, prefix: str,
                 errors: FileErrors) -> None:
        self.info = info
        self.path, self.records_path = bank / info.name, bank / info.records_name
        self.key_dim, self.num_targets = key_dim, num_targets
        self.prefix = prefix  # "bank '<name>': ", so that messages name the bank as requested
        self._errors = errors
        self._layout = _Layout(0, {}, 0)  # read from the file's header by `open`
        self._verified: dict[str, StatKey | None] = {"segment": None, "records": None}
        self._lock = threading.Lock()
        self.record_offsets = np.zeros(1, np.int64)
        self.id_hashes = np.zeros(0, np.int64)
        self.gates = np.zeros((0, num_targets), np.float32)

    @classmethod
    def open(cls, bank: Path, info: SegmentInfo, key_dim: int, num_targets: int, verify: bool, prefix: str,
             errors: FileErrors, trusted: dict[str, StatKey] | None = None) -> Segment:
        """Check a segment against the manifest; `verify`: hash both files and check every key finite (else
        only sizes and the header). `trusted`: file name -> stat of bytes this process verified already."""
        segment = cls(bank, info, key_dim, num_targets, prefix, errors)
        trusted = trusted or {}
        try:
            with open(segment.path, "rb") as f:
                stat = stat_key(os.fstat(f.fileno()))
                segment._check_header(f, stat)
                if verify and trusted.get(info.name) != stat:
                    small = segment._stream_verify(f)
                    segment._verified["segment"] = stat
                else:
                    small = {name: segment._pread(f, name) for name in _SMALL}
                    segment._verified["segment"] = stat if trusted.get(info.name) == stat else None
            segment._take_small(small)
            with open(segment.records_path, "rb") as f:
                stat = stat_key(os.fstat(f.fileno()))
                if stat[1] != int(segment.record_offsets[-1]):
                    raise BankError(f"records {info.records_name} hold {stat[1]} bytes, the segment says "
                                    f"{int(segment.record_offsets[-1])}")
                if verify and trusted.get(info.records_name) != stat:
                    segment._check_records_hash(f, changed=False)
                if verify or trusted.get(info.records_name) == stat:
                    segment._verified["records"] = stat
        except OSError as exc:
            records = getattr(exc, "filename", None) == str(segment.records_path)
            raise errors(f"records {info.records_name}" if records else f"segment {info.name}", exc) from exc
        return segment

    # ---- checks ----

    def _check_header(self, f: IO[bytes], stat: StatKey) -> None:
        """The header must describe exactly the four tensors of this segment's shape (any tensor order)."""
        label = f"segment {self.info.name}"
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= MAX_HEADER_BYTES:
            raise BankError(f"{label} is corrupt: not a safetensors file")
        try:
            header = json.loads(f.read(length))
            meta = header.pop("__metadata__", None)
        except (ValueError, AttributeError) as exc:
            raise BankError(f"{label} is corrupt: unreadable header ({type(exc).__name__})") from exc
        if not isinstance(meta, dict) or meta.get("format") != SEGMENT_FORMAT:
            raise BankError(f"{label} is not a {SEGMENT_FORMAT} file")
        n, d, t = self.info.rows, self.key_dim, self.num_targets
        shapes = {"record_offsets": ("I64", [n + 1]), "id_hashes": ("I64", [n]), "keys": ("F32", [n, d]),
                  "gates": ("F32", [n, t])}
        if set(header) != set(shapes):
            raise BankError(f"{label}: tensors {sorted(set(header) ^ set(shapes))[:6]} missing or unexpected")
        regions = {}
        for name, (dtype, shape) in shapes.items():
            entry = header[name] if isinstance(header[name], dict) else {}
            if entry.get("dtype") != dtype:
                raise BankError(f"{label}: tensor {name} is {str(entry.get('dtype'))[:20]}, expected {dtype}")
            if entry.get("shape") != shape:
                raise BankError(f"{label}: tensor {name} has shape {str(entry.get('shape'))[:40]}, "
                                f"expected {shape}")
            start, end = entry.get("data_offsets", (None, None))
            size = int(np.prod(shape)) * DTYPES[dtype].itemsize
            if type(start) is not int or type(end) is not int or start % 4 or end - start != size:
                raise BankError(f"{label}: tensor {name} has bad data offsets")
            regions[name] = (start, end)
        spans = sorted(regions.values())
        if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            raise BankError(f"{label}: tensors overlap or leave gaps")
        self._layout = _Layout(8 + length, regions, 8 + length + spans[-1][1])
        if stat[1] != self._layout.size:
            raise BankError(f"{label} is corrupt: {stat[1]} bytes, its header says {self._layout.size}")

    def _stream_verify(self, f: IO[bytes]) -> dict[str, np.ndarray]:
        """One sequential pass: sha256 of the whole file, every key finite, the small tensors captured."""
        label = f"segment {self.info.name}"
        digest = hashlib.sha256()
        f.seek(0)
        digest.update(_read_exact(f, self._layout.data_start, label))
        small: dict[str, np.ndarray] = {}
        row_bytes = 4 * self.key_dim
        for name, (start, end) in sorted(self._layout.regions.items(), key=lambda kv: kv[1]):
            if name != "keys":
                data = _read_exact(f, end - start, label)
                digest.update(data)
                small[name] = np.frombuffer(data, DTYPES["I64" if name != "gates" else "F32"])
                continue
            step = max(1, CHUNK_BYTES // max(row_bytes, 1)) * row_bytes
            for at in range(start, end, step):
                data = _read_exact(f, min(step, end - at), label)
                digest.update(data)
                if not np.isfinite(np.frombuffer(data, "<f4")).all():
                    raise BankError(f"{label}: tensor keys contains NaN or Inf")
        if digest.hexdigest() != self.info.sha256:
            raise BankError(f"{label} is corrupt: its sha256 does not match the manifest")
        return small

    def _pread(self, f: IO[bytes], name: str) -> np.ndarray:
        start, end = self._layout.regions[name]
        data = os.pread(f.fileno(), end - start, self._layout.data_start + start)
        if len(data) != end - start:
            raise BankError(f"segment {self.info.name} is corrupt: truncated")
        return np.frombuffer(data, "<f4" if name == "gates" else "<i8")

    def _take_small(self, small: dict[str, np.ndarray]) -> None:
        label = f"segment {self.info.name}"
        gates = small["gates"].reshape(self.info.rows, self.num_targets)
        if not np.isfinite(gates).all():
            raise BankError(f"{label}: tensor gates contains NaN or Inf")
        if gates.size and (gates.min() < 0 or gates.max() > 1):
            raise BankError(f"{label}: gates must lie in [0, 1]")
        offsets = small["record_offsets"]
        if offsets[0] != 0 or (np.diff(offsets) <= 0).any():
            raise BankError(f"{label}: record offsets are not increasing from 0")
        # (gates are handed out as bank.gates: a writable copy, like v1's, not a view of the bytes read)
        self.gates, self.record_offsets, self.id_hashes = gates.copy(), offsets, small["id_hashes"]

    def _check_records_hash(self, f: IO[bytes], changed: bool) -> None:
        digest = hashlib.sha256()
        f.seek(0)
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
        if digest.hexdigest() != self.info.records_sha256:
            why = "it changed on disk and its sha256 no longer matches" if changed else \
                "its sha256 does not match"
            raise BankError(f"{self.prefix}records {self.info.records_name} are corrupt: {why} the manifest")

    def verified_stat(self, which: str) -> StatKey | None:
        """The stat of the file ("segment" or "records") whose bytes were last verified (None: never)."""
        return self._verified[which]

    def stat_changed(self, which: str) -> bool:
        """Has the file ("segment" or "records") changed since its bytes were last verified?"""
        path = self.path if which == "segment" else self.records_path
        try:
            return stat_key(os.stat(path)) != self._verified[which]
        except OSError as exc:
            raise self._errors(self.label(which), exc) from exc

    def label(self, which: str) -> str:
        return f"segment {self.info.name}" if which == "segment" else f"records {self.info.records_name}"

    def recheck(self, which: str) -> None:
        """Re-verify a file whose stat changed (a touch, a restore, an in-place change)."""
        with self._checked(which):
            pass

    # ---- reads at run time ----

    def _checked(self, which: str) -> _CheckedFile:
        return _CheckedFile(self, which)

    def _reverify(self, which: str, f: IO[bytes], stat: StatKey) -> None:
        with self._lock:
            if self._verified[which] == stat:
                return
            if which == "segment":
                try:
                    self._stream_verify(f)
                except BankError as exc:
                    message = str(exc).replace("its sha256 does not match",
                                               "it changed on disk and its sha256 no longer matches")
                    raise BankError(f"{self.prefix}{message}") from exc
            else:
                self._check_records_hash(f, changed=self._verified[which] is not None)
            self._verified[which] = stat

    def key_rows(self, rows: np.ndarray) -> np.ndarray:
        """Keys of the given segment rows, float32 [len(rows), key_dim]."""
        out = np.empty((len(rows), self.key_dim), np.float32)
        row_bytes = 4 * self.key_dim
        base = self._layout.data_start + self._layout.regions["keys"][0]
        with self._checked("segment") as f:
            for i, row in enumerate(rows):
                data = os.pread(f.fileno(), row_bytes, base + int(row) * row_bytes)
                if len(data) != row_bytes:
                    raise BankError(f"{self.prefix}segment {self.info.name} is corrupt: truncated")
                out[i] = np.frombuffer(data, "<f4")
        if not np.isfinite(out).all():
            raise BankError(f"{self.prefix}segment {self.info.name}: keys contain NaN or Inf")
        return out

    def key_chunks(self, first: int, count: int, chunk_rows: int) -> Iterator[np.ndarray]:
        """Keys of rows [first, first + count) in blocks of at most chunk_rows rows."""
        row_bytes = 4 * self.key_dim
        base = self._layout.data_start + self._layout.regions["keys"][0]
        with self._checked("segment") as f:
            for at in range(first, first + count, chunk_rows):
                n = min(chunk_rows, first + count - at)
                block = np.empty((n, self.key_dim), np.float32)
                f.seek(base + at * row_bytes)
                if f.readinto(memoryview(block).cast("B")) != n * row_bytes:
                    raise BankError(f"{self.prefix}segment {self.info.name} is corrupt: truncated")
                if not np.isfinite(block).all():
                    raise BankError(f"{self.prefix}segment {self.info.name}: keys contain NaN or Inf")
                yield block

    def records(self, first: int, count: int) -> Iterator[tuple[int, Any]]:
        """(segment row, parsed JSON) of rows [first, first + count), read in large blocks."""
        offsets = self.record_offsets
        with self._checked("records") as f:
            row = first
            while row < first + count:
                end_row = int(np.searchsorted(offsets, offsets[row] + CHUNK_BYTES, side="right")) - 1
                end_row = min(max(end_row, row + 1), first + count)
                start = int(offsets[row])
                data = os.pread(f.fileno(), int(offsets[end_row]) - start, start)
                for r in range(row, end_row):
                    yield r, self._parse(data[offsets[r] - start: offsets[r + 1] - start], r)
                row = end_row

    def record(self, row: int) -> Any:
        with self._checked("records") as f:
            start, end = int(self.record_offsets[row]), int(self.record_offsets[row + 1])
            return self._parse(os.pread(f.fileno(), end - start, start), row)

    def _parse(self, line: bytes, row: int) -> Any:
        try:
            return json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BankError(f"{self.prefix}records {self.info.records_name}: row {row} is not valid JSON "
                            f"({type(exc).__name__})") from exc


class _CheckedFile:
    """Open a segment's file for reading, re-verifying it first when its stat changed since verification."""

    def __init__(self, segment: Segment, which: str) -> None:
        self.segment, self.which = segment, which
        self.name = segment.label(which)
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        seg = self.segment
        try:
            self.file = open(seg.path if self.which == "segment" else seg.records_path, "rb")
            stat = stat_key(os.fstat(self.file.fileno()))
            if stat != seg._verified[self.which]:
                seg._reverify(self.which, self.file, stat)
        except OSError as exc:
            self.__exit__()
            raise seg._errors(self.name, exc) from exc
        except BaseException:
            self.__exit__()
            raise
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _read_exact(f: IO[bytes], size: int, label: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise BankError(f"{label} is corrupt: truncated")
    return data
