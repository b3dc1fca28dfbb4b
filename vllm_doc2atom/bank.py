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
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BankError
from .fingerprint import MODULE_PARENTS, BaseModelFingerprint

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_NAME = "doc2atom-atom-bank"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
QUERY_PROJECTION = "query_projection.safetensors"  # optional: maps the sentence encoder into the key space
ATOM_TYPES = ("fact_claim", "entity_attribute", "event_relation", "process_step", "evidence_fragment")


@dataclass(frozen=True)
class Target:
    """One LoRA-adapted linear: a module name in one decoder layer."""

    module: str
    layer: int

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.module}"

    @classmethod
    def parse(cls, key: str) -> Target:
        layer, module = key.split(".", 1)
        return cls(module=module, layer=int(layer))


@dataclass
class BankSpec:
    """What every atom of a bank shares: the model it fits, where its LoRAs go, how it is keyed."""

    base_model: BaseModelFingerprint
    targets: list[Target]
    micro_rank: int
    lora_scaling: float = 1.0  # ΔW_i = lora_scaling · B_i A_i
    key_encoder: str = ""  # identity of the query encoder whose space the keys live in
    key_dim: int = 0
    checkpoint: str = ""  # identity of the compiler checkpoint that produced the factors
    router_head: dict[str, Any] | None = None  # trained RouterHead fields; None = the server's default head

    def __post_init__(self) -> None:
        if self.micro_rank < 1:
            raise BankError(f"micro_rank must be >= 1, got {self.micro_rank}")
        if self.key_dim < 1:
            raise BankError(f"key_dim must be >= 1, got {self.key_dim}")
        if not self.targets:
            raise BankError("a bank needs at least one LoRA target")
        if len(set(self.targets)) != len(self.targets):
            raise BankError("duplicate LoRA targets in spec")
        for t in self.targets:
            if t.module not in MODULE_PARENTS:
                raise BankError(f"unsupported target module {t.module!r}; choose from {sorted(MODULE_PARENTS)}")
            if not 0 <= t.layer < self.base_model.num_layers:
                raise BankError(f"target layer {t.layer} outside the base model's {self.base_model.num_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = [t.key for t in self.targets]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BankSpec:
        try:
            return cls(
                base_model=BaseModelFingerprint.from_dict(data["base_model"]),
                targets=[Target.parse(k) for k in data["targets"]],
                micro_rank=int(data["micro_rank"]),
                lora_scaling=float(data["lora_scaling"]),
                key_encoder=str(data["key_encoder"]),
                key_dim=int(data["key_dim"]),
                checkpoint=str(data.get("checkpoint", "")),
                router_head=data.get("router_head"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BankError(f"manifest spec is malformed: {type(exc).__name__}: {exc}") from exc

    def expected_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """The exact tensor set (name -> shape) of a shard holding n atoms."""
        shapes: dict[str, tuple[int, ...]] = {}
        for t in self.targets:
            d_in, d_out = self.base_model.module_shape(t.module)
            shapes[f"A.{t.key}"] = (n, self.micro_rank, d_in)
            shapes[f"B.{t.key}"] = (n, d_out, self.micro_rank)
        shapes["gates"] = (n, len(self.targets))
        shapes["keys"] = (n, self.key_dim)
        return shapes


@dataclass
class AtomRecord:
    """One knowledge atom's metadata; its tensors live in the document's shard."""

    id: str
    document_id: str
    type: str
    text: str
    span: tuple[int, int]  # [start, end) character offsets in the source document
    answer_bearing: bool = False
    abstraction_level: int = 0  # 0 = verbatim detail, higher = more abstract
    conflict_group: str | None = None  # atoms of one group contradict each other: route at most one
    confidence: float = 1.0
    relations: list[dict[str, str]] = field(default_factory=list)  # [{"type": ..., "target": atom id}]
    retrieval_text: str = ""  # what the key encodes, when it differs from `text` (e.g. with the entity prefixed)

    def __post_init__(self) -> None:
        if not self.id:
            raise BankError("atom record without an id")
        if self.type not in ATOM_TYPES:
            raise BankError(f"atom {self.id!r}: unknown type {self.type!r}; expected one of {ATOM_TYPES}")
        start, end = self.span
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise BankError(f"atom {self.id!r}: bad char span {self.span!r}")
        self.span = (start, end)
        if not 0.0 <= self.confidence <= 1.0:
            raise BankError(f"atom {self.id!r}: confidence {self.confidence} outside [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["span"] = list(self.span)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AtomRecord:
        try:
            return cls(**{**data, "span": tuple(data["span"])})
        except (KeyError, TypeError) as exc:
            raise BankError(f"malformed atom record {str(data)[:120]}: {exc}") from exc


@dataclass
class DocumentAtoms:
    """One document's compiled atoms, ready to be written as a shard. Row i of every tensor is atoms[i]."""

    document_id: str
    atoms: list[AtomRecord]
    tensors: dict[str, torch.Tensor]  # names and shapes as in BankSpec.expected_shapes(len(atoms))


@dataclass
class _Shard:
    document_id: str
    path: Path
    sha256: str
    first_row: int  # global index of the shard's first atom
    num_atoms: int


class AtomBank:
    """A loaded, validated atom bank. Keys and gates are in memory; factors are read on demand (mmap)."""

    def __init__(self, path: Path, spec: BankSpec, atoms: list[AtomRecord], shards: list[_Shard],
                 keys: np.ndarray, gates: np.ndarray, manifest_sha256: str) -> None:
        self.path = path
        self.spec = spec
        self.atoms = atoms
        self.keys = keys  # [N, key_dim] float32
        self.gates = gates  # [N, T] float32
        self.fingerprint = manifest_sha256  # changes with any change of content
        self._shards = shards

    def __len__(self) -> int:
        return len(self.atoms)

    def __repr__(self) -> str:
        return f"AtomBank({str(self.path)!r}, atoms={len(self)}, documents={len(self._shards)})"

    @property
    def document_ids(self) -> list[str]:
        return [s.document_id for s in self._shards]

    # ---- reading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, expect_base: BaseModelFingerprint | None = None,
             verify: bool = True) -> AtomBank:
        """Load and validate a bank. `verify` also checks shard hashes and that every factor is finite."""
        path = Path(path)
        if not path.is_dir():
            raise BankError(f"no atom bank at {path}: not a directory", kind="not_found")
        manifest_file = path / MANIFEST_NAME
        if not manifest_file.is_file():
            raise BankError(f"{path} is not an atom bank: missing {MANIFEST_NAME}")
        raw = manifest_file.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankError(f"{manifest_file}: invalid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise BankError(f"{manifest_file}: not a {FORMAT_NAME} manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BankError(f"{path}: unknown bank format version {version!r} (this build reads {FORMAT_VERSION})")
        spec = BankSpec.from_dict(manifest.get("spec") or {})
        if expect_base is not None:
            diffs = spec.base_model.differences(expect_base)
            if diffs:
                raise BankError(
                    f"{path} was compiled for base model {spec.base_model.name!r}, which does not match the "
                    f"served model {expect_base.name!r}: " + "; ".join(diffs), kind="mismatch")

        documents = manifest.get("documents")
        if not isinstance(documents, list):
            raise BankError(f"{manifest_file}: 'documents' must be a list")
        atoms: list[AtomRecord] = []
        shards: list[_Shard] = []
        keys: list[np.ndarray] = []
        gates: list[np.ndarray] = []
        seen_docs: set[str] = set()
        for entry in documents:
            try:
                doc_id, shard_name, sha, records = entry["id"], entry["shard"], entry["sha256"], entry["atoms"]
            except (KeyError, TypeError) as exc:
                raise BankError(f"{manifest_file}: malformed document entry ({exc})") from exc
            if doc_id in seen_docs:
                raise BankError(f"{manifest_file}: document {doc_id!r} listed twice")
            seen_docs.add(doc_id)
            doc_atoms = [AtomRecord.from_dict(r) for r in records]
            for atom in doc_atoms:
                if atom.document_id != doc_id:
                    raise BankError(f"atom {atom.id!r} is listed under document {doc_id!r} "
                                    f"but names {atom.document_id!r}")
            shard_path = _shard_path(path, shard_name)
            shard_keys, shard_gates = _read_shard(shard_path, spec, len(doc_atoms), sha if verify else None)
            shards.append(_Shard(doc_id, shard_path, sha, len(atoms), len(doc_atoms)))
            atoms.extend(doc_atoms)
            keys.append(shard_keys)
            gates.append(shard_gates)
        ids = [a.id for a in atoms]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise BankError(f"{manifest_file}: atom id {dup!r} is not unique")
        return cls(
            path=path, spec=spec, atoms=atoms, shards=shards,
            keys=np.concatenate(keys) if keys else np.zeros((0, spec.key_dim), np.float32),
            gates=np.concatenate(gates) if gates else np.zeros((0, len(spec.targets)), np.float32),
            manifest_sha256=hashlib.sha256(raw).hexdigest(),
        )

    def factors(self, indices: Sequence[int]) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
        """Micro-LoRA factors of the given atoms: target -> (A [k, r, in], B [k, out, r]), float32."""
        import torch
        from safetensors import safe_open

        if not indices:
            raise ValueError("no atoms selected")
        rows: dict[str, list[torch.Tensor]] = {}
        by_shard: dict[int, list[tuple[int, int]]] = {}  # shard no. -> [(position in output, row)]
        for pos, i in enumerate(indices):
            shard_no = self._shard_no(i)
            by_shard.setdefault(shard_no, []).append((pos, i - self._shards[shard_no].first_row))
        for shard_no, picks in by_shard.items():
            with safe_open(str(self._shards[shard_no].path), framework="pt") as f:
                for name in (f"{ab}.{t.key}" for t in self.spec.targets for ab in "AB"):
                    column = rows.setdefault(name, [None] * len(indices))  # type: ignore[list-item]
                    sliced = f.get_slice(name)
                    for pos, row in picks:
                        column[pos] = sliced[row : row + 1]
        return {t: (torch.cat(rows[f"A.{t.key}"]).float(), torch.cat(rows[f"B.{t.key}"]).float())
                for t in self.spec.targets}

    def _shard_no(self, index: int) -> int:
        if not 0 <= index < len(self.atoms):
            raise IndexError(f"atom index {index} outside bank of {len(self.atoms)} atoms")
        starts = [s.first_row for s in self._shards]
        return bisect.bisect_right(starts, index) - 1

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
        }

    # ---- writing -------------------------------------------------------------------------------

    def query_projection(self) -> np.ndarray | None:
        """The trained query projection stored with the bank, if any."""
        from safetensors.numpy import load_file

        file = self.path / QUERY_PROJECTION
        return load_file(str(file))["projection"] if file.is_file() else None

    @classmethod
    def create(cls, path: str | os.PathLike, spec: BankSpec, documents: Iterable[DocumentAtoms],
               overwrite: bool = False, query_projection: np.ndarray | None = None) -> AtomBank:
        """Write a new bank atomically: everything goes into a temp dir that is renamed into place."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise BankError(f"{path} already exists (pass overwrite=True to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            (tmp / SHARDS_DIR).mkdir(parents=True)
            if query_projection is not None:
                from safetensors.numpy import save_file

                save_file({"projection": np.ascontiguousarray(query_projection, dtype=np.float32)},
                          str(tmp / QUERY_PROJECTION))
                make_readable(tmp / QUERY_PROJECTION)
            entries = [_write_shard(tmp, spec, doc) for doc in documents]
            _check_unique_documents(entries)
            _write_manifest(tmp, spec, entries)
            if path.exists():
                # Swap: rename the old bank aside, the new one in, then drop the old one.
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote atom bank %s", path)
        return cls.load(path)

    def add_documents(self, documents: Iterable[DocumentAtoms], replace: bool = False) -> AtomBank:
        """Add documents' atoms (new shards + one atomic manifest swap); existing shards are untouched."""
        entries = self._manifest_entries()
        new_entries = [_write_shard(self.path, self.spec, doc) for doc in documents]
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
            raise BankError(f"documents not in the bank: {sorted(missing)}", kind="not_found")
        return self._commit([e for e in self._manifest_entries() if e["id"] not in drop])

    def _manifest_entries(self) -> list[dict[str, Any]]:
        return json.loads((self.path / MANIFEST_NAME).read_text())["documents"]

    def _commit(self, entries: list[dict[str, Any]]) -> AtomBank:
        _write_manifest(self.path, self.spec, entries)
        live = {(self.path / e["shard"]).name for e in entries}
        for shard in (self.path / SHARDS_DIR).glob("*.safetensors"):
            if shard.name not in live:
                shard.unlink(missing_ok=True)
        return AtomBank.load(self.path)


# ---- helpers -----------------------------------------------------------------------------------


def _shard_path(bank: Path, name: Any) -> Path:
    """Resolve a manifest shard name, refusing anything that leaves the bank's shards/ folder."""
    if not isinstance(name, str):
        raise BankError(f"shard name must be a string, got {name!r}")
    candidate = (bank / name).resolve()
    if candidate.parent != (bank / SHARDS_DIR).resolve():
        raise BankError(f"shard {name!r} points outside {bank / SHARDS_DIR}")
    if not candidate.is_file():
        raise BankError(f"{bank}: shard {name} is missing")
    return candidate


def _read_shard(path: Path, spec: BankSpec, num_atoms: int, sha256: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Check a shard's tensor set, shapes and values against the spec; return its keys and gates."""
    from safetensors import SafetensorError, safe_open

    if sha256 is not None and _file_sha256(path) != sha256:
        raise BankError(f"shard {path.name} is corrupt: its sha256 does not match the manifest")
    expected = spec.expected_shapes(num_atoms)
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                raise BankError(f"shard {path.name}: tensors {sorted(names ^ set(expected))} are "
                                f"{'missing' if set(expected) - names else 'unexpected'}")
            for name, shape in expected.items():
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    if got[:1] != shape[:1]:
                        raise BankError(f"shard {path.name}: {name} holds {got[0]} atoms but the manifest "
                                        f"lists {num_atoms}")
                    raise BankError(f"shard {path.name}: tensor {name} has shape {got}, expected {shape}")
                if sha256 is not None or name in ("keys", "gates"):
                    tensor = f.get_tensor(name)
                    if not tensor.is_floating_point():
                        raise BankError(f"shard {path.name}: tensor {name} is {tensor.dtype}, not floating point")
                    if not bool(tensor.isfinite().all()):
                        raise BankError(f"shard {path.name}: tensor {name} contains NaN or Inf")
                    if name == "keys":
                        keys = tensor.float().numpy()
                    elif name == "gates":
                        gates = tensor.float().numpy()
    except SafetensorError as exc:
        raise BankError(f"shard {path.name} is corrupt: {exc}") from exc
    if gates.size and (gates.min() < 0 or gates.max() > 1):
        raise BankError(f"shard {path.name}: gates must lie in [0, 1]")
    return keys, gates


def _write_shard(bank: Path, spec: BankSpec, doc: DocumentAtoms) -> dict[str, Any]:
    """Validate a document's tensors, write them as a content-addressed shard, return its manifest entry."""
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
        if not bool(torch.isfinite(tensor).all()):
            raise BankError(f"document {doc.document_id!r}: {name} contains NaN or Inf")
    for atom in doc.atoms:
        if atom.document_id != doc.document_id:
            raise BankError(f"atom {atom.id!r} names document {atom.document_id!r}, not {doc.document_id!r}")

    shards = bank / SHARDS_DIR
    shards.mkdir(exist_ok=True)
    tmp = shards / f".tmp-{uuid.uuid4().hex}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in doc.tensors.items()}, str(tmp),
                  metadata={"document_id": doc.document_id})
        make_readable(tmp)
        sha = _file_sha256(tmp)
        final = shards / f"{sha[:16]}.safetensors"
        os.replace(tmp, final)  # same content, same name: replacing is harmless
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "id": doc.document_id,
        "shard": f"{SHARDS_DIR}/{final.name}",
        "sha256": sha,
        "num_atoms": len(doc.atoms),
        "atoms": [a.to_dict() for a in doc.atoms],
    }


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


def make_readable(path: Path) -> None:
    """safetensors >= 0.7 creates files 0600; banks and checkpoints are often built by one user, served by another."""
    os.chmod(path, 0o644)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
