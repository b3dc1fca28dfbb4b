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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BankError
from .files import atomic_directory, atomic_write_text, make_readable, temp_name
from .fingerprint import MODULE_PARENTS, BaseModelFingerprint

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_NAME = "doc2atom-atom-bank"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
QUERY_PROJECTION = "query_projection.safetensors"  # optional: maps the sentence encoder into the key space
StatKey = tuple[int, int, int, int]  # (st_ino, st_size, st_mtime_ns, st_ctime_ns): still the same file?
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
        if self.router_head is not None:
            from .router import RouterHead  # lazily: router imports this module

            RouterHead.from_dict(self.router_head)  # refuse a bad head now, not mid-routing

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
        except (KeyError, TypeError, ValueError) as exc:
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
            raise BankError("no atom bank there (not a directory)", kind="not_found")
        if not (path / MANIFEST_NAME).is_file():
            raise BankError(f"not an atom bank: missing {MANIFEST_NAME}")
        try:
            with open(path / MANIFEST_NAME, "rb") as f:
                manifest_stat = _stat_key(os.fstat(f.fileno()))  # of exactly the bytes read
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
                    f"served model {expect_base.name!r}: " + "; ".join(diffs), kind="mismatch")

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
                shard_path = _shard_path(path, shard_name)
                relative = f"{SHARDS_DIR}/{shard_path.name}"
                shard_keys, shard_gates, stat = _read_shard(shard_path, relative, spec, len(doc_atoms),
                                                            sha if verify else None)
            except BankError as exc:
                if _stat_or_none(path / MANIFEST_NAME) != manifest_stat:  # e.g. `bank remove` dropped the shard
                    raise BankError("changed on disk while it was loaded; reload it", kind="stale") from exc
                raise
            shards.append(_Shard(doc_id, shard_path, relative, sha, len(atoms), len(doc_atoms), stat))
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
            raise BankError(f"bank {self.name!r} changed on disk; reload it", kind="stale")
        for shard in self._shards if shards else ():
            try:
                unchanged = _stat_key(os.stat(shard.path)) == shard.stat
            except FileNotFoundError:
                raise self._missing(shard) from None
            except OSError as exc:
                raise self._unreadable(shard, exc) from exc
            if not unchanged:
                self._read_verified(shard)

    def shard_label(self, index: int) -> str:
        """Which file holds an atom's factors, for messages: "shard shards/<sha>.safetensors"."""
        return f"shard {self._shards[self._shard_no(index)].name}"

    def _read_verified(self, shard: _Shard) -> dict[str, torch.Tensor]:
        """A shard's tensors, read whole and checked against the manifest's sha256 (about a millisecond
        per MB): whatever happened to the file since loading, what is returned is what was compiled."""
        try:
            tensors, shard.stat = _read_checked(shard.path, shard.sha256, f"bank {self.name!r}: shard {shard.name}",
                                                "it changed on disk and its sha256 no longer matches the manifest")
        except FileNotFoundError:
            raise self._missing(shard) from None
        except OSError as exc:
            raise self._unreadable(shard, exc) from exc
        return tensors  # the same content (perhaps rewritten: an identical add, a restore, a touch)

    def _missing(self, shard: _Shard) -> BankError:
        if self._manifest_changed():  # e.g. `doc2atom bank remove` dropped it after swapping the manifest
            return BankError(f"bank {self.name!r} changed on disk while in use (shard {shard.name} is gone); "
                             "reload it", kind="stale")
        return BankError(f"bank {self.name!r}: shard {shard.name} is missing")

    def _unreadable(self, shard: _Shard, exc: OSError) -> BankError:
        return BankError(f"bank {self.name!r}: shard {shard.name} cannot be read "
                         f"({exc.strerror or type(exc).__name__})")

    def _manifest_changed(self) -> bool:
        stat = _stat_or_none(self.path / MANIFEST_NAME)
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
        }

    # ---- writing -------------------------------------------------------------------------------

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
               overwrite: bool = False, query_projection: np.ndarray | None = None) -> AtomBank:
        """Write a new bank atomically: everything goes into a temp dir that is renamed into place."""
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
            entries = [_write_shard(tmp, spec, doc) for doc in documents]
            _check_unique_documents(entries)
            _write_manifest(tmp, spec, entries)
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
        return AtomBank.load(self.path, name=self.name)


# ---- helpers -----------------------------------------------------------------------------------


def _shard_path(bank: Path, name: Any) -> Path:
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


def _read_shard(path: Path, relative: str, spec: BankSpec, num_atoms: int,
                sha256: str | None) -> tuple[np.ndarray, np.ndarray, StatKey]:
    """Check a shard's tensor set, shapes and values against the spec; return its keys, gates and the stat
    of the file as read."""
    label = f"shard {relative}"
    try:
        tensors, stat = _read_checked(path, sha256, label)
    except FileNotFoundError:
        raise BankError(f"{label} is missing") from None
    except OSError as exc:
        raise BankError(f"{label} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    keys, gates = _check_tensors(tensors, label, spec, num_atoms, full=sha256 is not None)
    if gates.size and (gates.min() < 0 or gates.max() > 1):
        raise BankError(f"{label}: gates must lie in [0, 1]")
    return keys, gates, stat


def _read_checked(path: Path, sha256: str | None, label: str,
                  mismatch: str = "its sha256 does not match the manifest") -> tuple[dict[str, torch.Tensor], StatKey]:
    """A shard's tensors (its bytes checked against `sha256` unless None) and the stat of exactly the file read.

    Read whole, never mmapped: a shard truncated under an mmap (safetensors' safe_open) kills the whole server
    with SIGBUS; here it is a hash mismatch. OSError (a missing or unreadable file) is left to the caller."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open(path, "rb") as f:
        stat = _stat_key(os.fstat(f.fileno()))
        data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BankError(f"{label} is corrupt: {mismatch}")
    try:
        return load(data), stat
    except (SafetensorError, ValueError, TypeError) as exc:
        raise BankError(f"{label} is corrupt: not a readable safetensors file ({str(exc)[:200]})") from exc


def _check_tensors(tensors: dict[str, torch.Tensor], label: str, spec: BankSpec, num_atoms: int,
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


def _stat_or_none(path: Path) -> StatKey | None:
    try:
        return _stat_key(os.stat(path))
    except OSError:
        return None


def _stat_key(st: os.stat_result) -> StatKey:
    # ctime too: unlike mtime, no one can set it back, so an in-place rewrite cannot pass for unchanged.
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


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
        if not tensor.is_floating_point():
            raise BankError(f"document {doc.document_id!r}: {name} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise BankError(f"document {doc.document_id!r}: {name} contains NaN or Inf")
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
