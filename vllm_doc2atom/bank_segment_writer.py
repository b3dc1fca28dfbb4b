"""Writing a format-v2 segment (layout: `bank_segments`): documents' keys, gates and records streamed into temp
files, then assembled into the two content-addressed segment files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bank_interface import AtomRecord
from .bank_segments import CHUNK_BYTES, DTYPES, SEGMENT_FORMAT, SEGMENTS_DIR, SegmentInfo, id_hash
from .errors import BankError
from .files import make_readable, temp_name

logger = logging.getLogger(__name__)


class SegmentWriter:
    """Streams documents' keys, gates and records into temp files; `finish` assembles the two segment files.
    Memory stays O(one document) apart from 16 bytes per row of offsets and hashes."""

    def __init__(self, bank: Path, key_dim: int, num_targets: int) -> None:
        self.folder = bank / SEGMENTS_DIR
        self.folder.mkdir(exist_ok=True)
        self.key_dim, self.num_targets = key_dim, num_targets
        self._temps = {kind: temp_name(self.folder / kind) for kind in ("keys", "gates", "jsonl", "segment")}
        self._keys = open(self._temps["keys"], "wb")
        self._gates = open(self._temps["gates"], "wb")
        self._records = open(self._temps["jsonl"], "wb")
        self._records_sha = hashlib.sha256()
        self._offsets = [0]
        self._hashes: list[int] = []
        self.rows = 0
        self.documents = 0

    def add(self, keys: np.ndarray, gates: np.ndarray, records: Sequence[AtomRecord]) -> int:
        """Append one document's rows (already validated); returns the segment row of its first atom."""
        first = self.rows
        if gates.size and not (0 <= gates.min() and gates.max() <= 1):
            raise BankError("gates must lie in [0, 1]")
        self.documents += 1
        self._keys.write(np.ascontiguousarray(keys, dtype="<f4").tobytes())
        self._gates.write(np.ascontiguousarray(gates, dtype="<f4").tobytes())
        for record in records:
            line = (json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            self._records.write(line)
            self._records_sha.update(line)
            self._offsets.append(self._offsets[-1] + len(line))
            self._hashes.append(id_hash(record.id))
        self.rows += len(records)
        return first

    @property
    def hashes(self) -> np.ndarray:
        """The id hashes of the rows added so far."""
        return np.asarray(self._hashes, np.int64)

    def finish(self) -> SegmentInfo | None:
        """Write the segment (None when no document was added) under its content-addressed names."""
        for f in (self._keys, self._gates, self._records):
            f.close()
        if not self.documents:
            return None
        n = self.rows
        parts = [("record_offsets", "I64", [n + 1], np.asarray(self._offsets, "<i8").tobytes()),
                 ("id_hashes", "I64", [n], np.asarray(self._hashes, "<i8").tobytes()),
                 ("keys", "F32", [n, self.key_dim], self._temps["keys"]),
                 ("gates", "F32", [n, self.num_targets], self._temps["gates"])]
        header: dict[str, Any] = {"__metadata__": {"format": SEGMENT_FORMAT}}
        offset = 0
        for name, dtype, shape, _ in parts:
            size = int(np.prod(shape)) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header so the data starts 8-byte aligned
        digest = hashlib.sha256()
        with open(self._temps["segment"], "wb") as out:
            for piece in _pieces(len(raw).to_bytes(8, "little") + raw, parts):
                out.write(piece)
                digest.update(piece)
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        info = SegmentInfo(sha, self._records_sha.hexdigest(), n)
        bank = self.folder.parent
        with open(self._temps["jsonl"], "rb") as f:
            os.fsync(f.fileno())
        for kind, final in (("jsonl", info.records_name), ("segment", info.name)):
            make_readable(self._temps[kind])
            os.replace(self._temps[kind], bank / final)  # same content, same name: replacing is harmless
        logger.debug("wrote segment %s (%d rows)", info.name, n)
        return info

    def close(self) -> None:
        """Remove the temp files (after finish, or on failure)."""
        for f in (self._keys, self._gates, self._records):
            f.close()
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pieces(head: bytes, parts: list[tuple[str, str, list[int], Any]]) -> Iterator[bytes]:
    yield head
    for _, _, _, data in parts:
        if isinstance(data, bytes):
            yield data
            continue
        with open(data, "rb") as f:
            yield from iter(lambda: f.read(CHUNK_BYTES), b"")
