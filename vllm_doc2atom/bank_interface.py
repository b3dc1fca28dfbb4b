"""The bank interface: what every atom shares (BankSpec), what each atom is (AtomRecord), and what the router
and composer need from a bank (RoutableBank) — satisfied by one loaded AtomBank and by a BankUnion of several."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import BankError
from .fingerprint import MODULE_PARENTS, BaseModelFingerprint
from .router_head import RouterHead

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class RerankerIdentity:
    """What a bank records of the reranker it was calibrated with."""

    name: str
    sha256: str  # of reranker.safetensors

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RerankerIdentity:
        ok = isinstance(data, dict) and set(data) == {"name", "sha256"} and all(
            isinstance(v, str) and v for v in data.values())
        if not ok or len(data["sha256"]) != 64:
            raise BankError(f"malformed reranker identity in the manifest: {str(data)[:80]}")
        return cls(data["name"], data["sha256"])


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
    # {"name", "sha256"} of the stage-2 reranker the bank was calibrated with: the server routes it with that
    # reranker or not at all (None: stage 1 only, as banks compiled before rerankers)
    reranker: dict[str, str] | None = None

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
            RouterHead.from_dict(self.router_head)  # refuse a bad head now, not mid-routing
        if self.reranker is not None:
            RerankerIdentity.from_dict(self.reranker)

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
                reranker=data.get("reranker"),
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


class RoutableBank(Protocol):
    """What Router, RouterPool, encoder_for, compose and adapter_identity read from a bank. Rows are atoms:
    row i of `keys` and `gates` belongs to `atoms[i]`."""

    name: str  # how messages and provenance name the bank
    path: PurePath
    spec: BankSpec
    fingerprint: str  # changes with any change of content: caches are keyed by it
    atoms: Sequence[AtomRecord]  # read-only; a v2 AtomBank parses a record when it is accessed
    keys: np.ndarray  # [N, key_dim] float32 (Router prefers `key_source()`, when a bank has one)
    gates: np.ndarray  # [N, T] float32, columns in spec.targets order

    def __len__(self) -> int: ...

    @property
    def document_ids(self) -> list[str]: ...

    def factors(self, rows: Sequence[int]) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]: ...

    def query_projection(self) -> np.ndarray | None: ...

    def bank_name_of(self, row: int) -> str: ...  # the bank a row's atom comes from (for provenance)

    def shard_label(self, row: int) -> str: ...

    def check_files(self, shards: bool = True) -> None: ...

    def reranker_folders(self) -> list[Path]: ...  # where the bank keeps its own reranker (if not shipped)
