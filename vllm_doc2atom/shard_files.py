"""One document's shard on disk: a content-addressed safetensors file, written once, checked on every read.

Shards are read whole, never mmapped, and hashed against the manifest's sha256, so a shard changed, truncated
or deleted under a running server is a BankError, never NaN factors or a crash. Both bank formats share the
shard layout (a v2 bank routes with its segments' copy of `keys` and `gates`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bank_interface import BankSpec, DocumentAtoms
from .errors import BankError
from .files import file_sha256, make_readable, temp_name

if TYPE_CHECKING:
    import torch

SHARDS_DIR = "shards"
StatKey = tuple[int, int, int, int]  # (st_ino, st_size, st_mtime_ns, st_ctime_ns): still the same file?


def shard_path(bank: Path, name: Any) -> Path:
    """Resolve a manifest shard name, refusing anything that leaves the bank's shards/ folder."""
    if not isinstance(name, str):
        raise BankError(f"shard name must be a string, got {str(name)[:80]!r}")
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    try:
        candidate = (bank / name).resolve()
        inside = candidate.parent == (bank / SHARDS_DIR).resolve()
        exists = inside and candidate.is_file()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long, a NUL
        raise BankError(f"shard {shown} cannot be resolved ({type(exc).__name__})") from exc
    if not inside:
        raise BankError(f"shard {shown} points outside {SHARDS_DIR}/")
    if not exists:
        raise BankError(f"shard {shown} is missing")
    return candidate


def read_shard(path: Path, relative: str, spec: BankSpec, num_atoms: int,
                sha256: str | None) -> tuple[np.ndarray, np.ndarray, StatKey]:
    """Check a shard's tensor set, shapes and values against the spec; return its keys, gates and the stat
    of the file as read."""
    label = f"shard {relative}"
    try:
        tensors, stat = read_checked(path, sha256, label)
    except FileNotFoundError:
        raise BankError(f"{label} is missing") from None
    except OSError as exc:
        raise BankError(f"{label} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    keys, gates = check_tensors(tensors, label, spec, num_atoms, full=sha256 is not None)
    if gates.size and (gates.min() < 0 or gates.max() > 1):
        raise BankError(f"{label}: gates must lie in [0, 1]")
    return keys, gates, stat


def read_checked(path: Path, sha256: str | None, label: str,
                  mismatch: str = "its sha256 does not match the manifest") -> tuple[dict[str, torch.Tensor], StatKey]:
    """A shard's tensors (its bytes checked against `sha256` unless None) and the stat of exactly the file read.

    Read whole, never mmapped: a shard truncated under an mmap (safetensors' safe_open) kills the whole server
    with SIGBUS; here it is a hash mismatch. OSError (a missing or unreadable file) is left to the caller."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open(path, "rb") as f:
        stat = stat_key(os.fstat(f.fileno()))
        data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BankError(f"{label} is corrupt: {mismatch}")
    try:
        return load(data), stat
    except (SafetensorError, ValueError, TypeError) as exc:
        raise BankError(f"{label} is corrupt: not a readable safetensors file ({str(exc)[:200]})") from exc


def check_tensors(tensors: dict[str, torch.Tensor], label: str, spec: BankSpec, num_atoms: int,
                  full: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tensor names and shapes as the spec says; keys and gates (and with `full`, every tensor) finite floats."""
    expected = spec.expected_shapes(num_atoms)
    if set(tensors) != set(expected):
        raise BankError(f"{label}: tensors {sorted(set(tensors) ^ set(expected))[:8]} are "
                        f"{'missing' if set(expected) - set(tensors) else 'unexpected'}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            if got[:1] != shape[:1]:
                raise BankError(f"{label}: {name} holds {got[0] if got else 0} atoms but the manifest "
                                f"lists {num_atoms}")
            raise BankError(f"{label}: tensor {name} has shape {got}, expected {shape}")
        if not tensors[name].is_floating_point():
            raise BankError(f"{label}: tensor {name} is {tensors[name].dtype}, not floating point")
    for name in expected if full else ("keys", "gates"):
        if not bool(tensors[name].isfinite().all()):
            raise BankError(f"{label}: tensor {name} contains NaN or Inf")
    return tensors["keys"].float().numpy(), tensors["gates"].float().numpy()


def stat_or_none(path: Path) -> StatKey | None:
    try:
        return stat_key(os.stat(path))
    except OSError:
        return None


def stat_key(st: os.stat_result) -> StatKey:
    # ctime too: unlike mtime, no one can set it back, so an in-place rewrite cannot pass for unchanged.
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def shard_name(sha256: str) -> str:
    """A shard's name relative to its bank, from its content hash."""
    return f"{SHARDS_DIR}/{sha256[:16]}.safetensors"


def write_shard(bank: Path, spec: BankSpec, doc: DocumentAtoms) -> str:
    """Validate a document's tensors and records, write them as a content-addressed shard; return its
    sha256."""
    import torch
    from safetensors.torch import save_file

    expected = spec.expected_shapes(len(doc.atoms))
    if set(doc.tensors) != set(expected):
        raise BankError(f"document {doc.document_id!r}: tensors {sorted(set(doc.tensors) ^ set(expected))} "
                        "missing or unexpected")
    for name, shape in expected.items():
        tensor = doc.tensors[name]
        if tuple(tensor.shape) != shape:
            raise BankError(f"document {doc.document_id!r}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if not tensor.is_floating_point():
            raise BankError(f"document {doc.document_id!r}: {name} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise BankError(f"document {doc.document_id!r}: {name} contains NaN or Inf")
    gates = doc.tensors["gates"]
    if gates.numel() and not (0 <= float(gates.min()) and float(gates.max()) <= 1):
        raise BankError(f"document {doc.document_id!r}: gates must lie in [0, 1]")
    for atom in doc.atoms:
        if atom.document_id != doc.document_id:
            raise BankError(f"atom {atom.id!r} names document {atom.document_id!r}, not {doc.document_id!r}")

    shards = bank / SHARDS_DIR
    shards.mkdir(exist_ok=True)
    tmp = temp_name(shards / "shard")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in doc.tensors.items()}, str(tmp),
                  metadata={"document_id": doc.document_id})
        make_readable(tmp)
        sha = file_sha256(tmp)
        os.replace(tmp, bank / shard_name(sha))  # same content, same name: replacing is harmless
    finally:
        tmp.unlink(missing_ok=True)
    return sha

