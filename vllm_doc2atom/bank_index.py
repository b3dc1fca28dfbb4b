"""A large bank's stage-1 index, stored with it (format v2, optional): index/<sha256[:16]>.safetensors holds
one uint8 tensor `index` (faiss's serialised IVF index) and, in the safetensors metadata, what built it
(key_index.stored_meta). The writer stores one at every commit that leaves more than `CONFIG.exact_max` live
rows, so that a server loads it in a second instead of building it at its first request (~15 s at a million
atoms), in every process and after every restart. A smaller bank gets none: its exact index builds as fast as
it would be read. The manifest lists it as {"sha256", "rows"}; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bank_segments import is_sha256
from .errors import BankError
from .files import atomic_file
from .key_index import KeyIndex, KeyIndexConfig, KeySource, stored_matches

INDEX_DIR = "index"
TENSOR = "index"
MAX_HEADER = 1 << 20  # a safetensors header of one tensor and its metadata is a few hundred bytes
# What the writer builds with: a server routing with the default KeyIndexConfig loads the stored index as is.
CONFIG = KeyIndexConfig()


@dataclass(frozen=True)
class StoredIndexInfo:
    """The manifest's "index" entry."""

    sha256: str
    rows: int

    @property
    def name(self) -> str:
        """The file, relative to the bank."""
        return f"{INDEX_DIR}/{self.sha256[:16]}.safetensors"

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "rows": self.rows}

    @classmethod
    def from_dict(cls, entry: Any) -> StoredIndexInfo:
        sha, rows = (entry.get("sha256"), entry.get("rows")) if isinstance(entry, dict) else (None, None)
        if not is_sha256(sha) or type(rows) is not int or rows < 0:
            raise BankError("manifest.json: 'index' must be {\"sha256\": <64 hex digits>, \"rows\": <count>}")
        return cls(sha, rows)


def write_index(bank: Path, source: KeySource,
                config: KeyIndexConfig | None = None) -> StoredIndexInfo | None:
    """Build the index over `source` and store it (atomically, content-addressed); None for a bank small
    enough to be searched exactly."""
    from safetensors.numpy import save

    config = config or CONFIG
    if len(source) <= config.exact_max:
        return None
    data, meta = KeyIndex(source, config).serialize()
    raw = save({TENSOR: data}, metadata=meta)
    info = StoredIndexInfo(hashlib.sha256(raw).hexdigest(), len(source))
    with atomic_file(bank / info.name) as tmp, open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return info


def read_index(bank: Path, info: StoredIndexInfo, source: KeySource, config: KeyIndexConfig,
               prefix: str) -> KeyIndex | None:
    """The stored index, if `config` would build the same one over `source` (else None: build it). The file is
    checked against the manifest's sha256 first, even when it is not used: a damaged bank is said to be so.
    A damaged file raises BankError (invalid); an OSError propagates for the caller to name (a file gone
    because the bank changed is stale, not invalid)."""
    label = f"{prefix}index {info.name}"
    with open(bank / info.name, "rb") as f:
        raw = bytearray(os.fstat(f.fileno()).st_size)  # writable: faiss reads the tensor in place
        if f.readinto(memoryview(raw)) != len(raw):
            raise BankError(f"{label} changed while being read")
    if hashlib.sha256(raw).hexdigest() != info.sha256:
        raise BankError(f"{label}: its sha256 does not match the manifest")
    (start, end), meta = _header(raw, label)
    if not stored_matches(meta, config, len(source), source.dim):
        return None
    try:
        return KeyIndex.deserialize(np.frombuffer(raw, np.uint8)[start:end], meta, source, config)
    except (RuntimeError, ValueError) as exc:  # faiss raises RuntimeError on bytes it cannot parse
        raise BankError(f"{label} is corrupt ({str(exc).splitlines()[0][:200]})") from exc


def _header(raw: bytearray, label: str) -> tuple[tuple[int, int], dict[str, str]]:
    """((start, end) of the one uint8 tensor in `raw`, the metadata) from a safetensors file's header."""
    size = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    if not 0 < size <= min(MAX_HEADER, len(raw) - 8):
        raise BankError(f"{label} is corrupt: not a safetensors file")
    try:
        header = json.loads(bytes(raw[8: 8 + size]))
        tensor, meta = header[TENSOR], header["__metadata__"]
        start, end = (8 + size + int(x) for x in tensor["data_offsets"])
        ok = tensor["dtype"] == "U8" and tensor["shape"] == [end - start] and end == len(raw) and \
            set(header) == {TENSOR, "__metadata__"} and isinstance(meta, dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise BankError(f"{label} is corrupt: bad header ({type(exc).__name__})") from exc
    if not ok:
        raise BankError(f"{label} is corrupt: not one uint8 tensor {TENSOR!r} with metadata")
    return (start, end), meta
