"""Several loaded atom banks presented as one, so one question can route over (and compose from) all.

A union's rows are its members' rows in order: member 0's atoms, then member 1's, and so on. Like an
AtomBank, it is a RoutableBank (bank_interface.py). Banks can be combined only when their atoms fit one LoRA
and their keys one key space: same base model, targets, micro rank, LoRA scaling, key encoder and query
projection, and the same router head up to its threshold (the union refuses least: it takes the lowest
member threshold).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from .bank import AtomBank
from .bank_interface import AtomRecord, BankSpec, Target
from .bank_rows import RecordSequence
from .errors import BankError, BankErrorKind
from .key_index import ChainedKeys, KeySource
from .router_head import RouterHead

if TYPE_CHECKING:
    import torch


class BankUnion:
    def __init__(self, banks: Sequence[AtomBank], names: Sequence[str] | None = None) -> None:
        """`names`: how provenance and messages name each member (default: each bank's own name)."""
        names = [b.name for b in banks] if names is None else list(names)
        if not banks:
            raise BankError("name at least one atom bank", kind=BankErrorKind.BAD_REQUEST)
        if len(names) != len(banks):
            raise ValueError(f"{len(banks)} banks but {len(names)} names")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BankError(f"atom banks named more than once: {[n[:80] for n in twice]}",
                            kind=BankErrorKind.BAD_REQUEST)
        first = banks[0]
        projection = first.query_projection()
        for name, bank in zip(names[1:], banks[1:]):
            problem = _incompatibility(first.spec, bank.spec)
            if problem is None and not _same_array(projection, bank.query_projection()):
                problem = "their query projections differ"
            if problem:
                raise BankError(f"atom banks {names[0]!r} and {name!r} cannot be routed together: {problem}",
                                kind=BankErrorKind.BAD_REQUEST)
        self.banks = list(banks)
        self.names = names
        self.name = "+".join(names)
        self.path = PurePosixPath(self.name)  # no member's real path: this only ever appears in messages
        self.spec = dataclasses.replace(first.spec, router_head=_merged_head([b.spec for b in banks]))
        # One member: its own fingerprint (same keys, same tensors), so indexes and adapters are shared.
        fingerprints = [b.fingerprint for b in banks]
        self.fingerprint = fingerprints[0] if len(banks) == 1 else \
            hashlib.sha256(("union|" + "|".join(fingerprints)).encode()).hexdigest()
        self._projection = projection
        self._starts = np.cumsum([0] + [len(b) for b in banks[:-1]]).tolist()

    def __len__(self) -> int:
        return sum(len(b) for b in self.banks)

    def __repr__(self) -> str:
        return f"BankUnion({self.names!r}, atoms={len(self)})"

    @cached_property
    def atoms(self) -> Sequence[AtomRecord]:
        """The members' records one after another, without copying them (a member may hold millions)."""
        return _Chained([bank.atoms for bank in self.banks])

    @cached_property
    def keys(self) -> np.ndarray:
        """Every member's keys in memory (the router builds its index from `key_source()` instead)."""
        return np.concatenate([bank.keys for bank in self.banks])

    def key_source(self) -> KeySource:
        return ChainedKeys([bank.key_source() for bank in self.banks])

    @cached_property
    def gates(self) -> np.ndarray:
        # Gate columns follow spec.targets: a member listing the same targets in another order is permuted.
        order = self.spec.targets
        return np.concatenate([b.gates[:, [b.spec.targets.index(t) for t in order]] for b in self.banks])

    @property
    def document_ids(self) -> list[str]:
        """Every member's documents in row order (an id may repeat across banks)."""
        return [doc for bank in self.banks for doc in bank.document_ids]

    def member_of(self, row: int) -> tuple[int, int]:
        """(member number, row in that member) of a union row."""
        if not 0 <= row < len(self):
            raise IndexError(f"atom index {row} outside bank union of {len(self)} atoms")
        member = bisect.bisect_right(self._starts, row) - 1
        return member, row - self._starts[member]

    def bank_name_of(self, row: int) -> str:
        """The name of the bank a union row's atom comes from (for provenance)."""
        return self.names[self.member_of(row)[0]]

    def shard_label(self, row: int) -> str:
        member, local = self.member_of(row)
        return f"bank {self.names[member]!r} {self.banks[member].shard_label(local)}"

    def factors(self, rows: Sequence[int]) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
        """As AtomBank.factors, for union rows: each member reads its own atoms, in the requested order."""
        import torch

        if not rows:
            raise ValueError("no atoms selected")
        picks: dict[int, list[tuple[int, int]]] = {}  # member -> [(position in output, member row)]
        for pos, row in enumerate(rows):
            member, local = self.member_of(row)
            picks.setdefault(member, []).append((pos, local))
        out: dict[Target, tuple[torch.Tensor, torch.Tensor]] = {}
        for member, sel in picks.items():
            positions = torch.tensor([pos for pos, _ in sel])
            for target, (a, b) in self.banks[member].factors([local for _, local in sel]).items():
                if target not in out:
                    out[target] = (a.new_empty((len(rows), *a.shape[1:])),
                                   b.new_empty((len(rows), *b.shape[1:])))
                out[target][0][positions] = a
                out[target][1][positions] = b
        return out

    def query_projection(self) -> np.ndarray | None:
        return self._projection

    def check_files(self, shards: bool = True) -> None:
        for bank in self.banks:
            bank.check_files(shards)

    def reranker_folders(self) -> list[Path]:
        return [folder for bank in self.banks for folder in bank.reranker_folders()]


class _Chained(RecordSequence):
    """Sequences one after another, read-only."""

    what = "bank union"

    def __init__(self, parts: Sequence[Sequence[AtomRecord]]) -> None:
        self._parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in self._parts]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def _at(self, row: int) -> AtomRecord:
        part = bisect.bisect_right(self._starts, row) - 1
        return self._parts[part][row - self._starts[part]]

    def __iter__(self) -> Iterator[AtomRecord]:
        for part in self._parts:
            yield from part


def _incompatibility(a: BankSpec, b: BankSpec) -> str | None:
    """Why two banks' atoms cannot be routed and composed together (None: they can)."""
    diffs = a.base_model.differences(b.base_model)
    if diffs:
        return "they were compiled for different base models (" + "; ".join(diffs) + ")"
    if set(a.targets) != set(b.targets):
        only_a = sorted(t.key for t in set(a.targets) - set(b.targets))
        only_b = sorted(t.key for t in set(b.targets) - set(a.targets))
        return f"different LoRA targets (only in the first: {only_a[:8]}; only in the second: {only_b[:8]})"
    if a.micro_rank != b.micro_rank:
        return f"different micro_rank ({a.micro_rank} != {b.micro_rank})"
    if a.lora_scaling != b.lora_scaling:
        return f"different lora_scaling ({a.lora_scaling} != {b.lora_scaling})"
    if (a.key_encoder, a.key_dim) != (b.key_encoder, b.key_dim):
        return (f"their keys live in different spaces ({a.key_encoder!r}, {a.key_dim}-d != "
                f"{b.key_encoder!r}, {b.key_dim}-d)")
    if a.reranker != b.reranker:
        return "they were calibrated with different rerankers"
    return _head_difference(a.router_head, b.router_head)


def _head_difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str | None:
    if (a is None) != (b is None):
        return "one has a trained router head and the other has none (only the threshold may differ)"
    if a is None or b is None:
        return None
    head_a, head_b = dataclasses.asdict(RouterHead.from_dict(a)), dataclasses.asdict(RouterHead.from_dict(b))
    differing = [k for k in head_a if k != "threshold" and head_a[k] != head_b[k]]
    if differing:
        return f"their router heads differ in {differing} (only the threshold may differ)"
    return None


def _merged_head(specs: list[BankSpec]) -> dict[str, Any] | None:
    """The first member's head with the lowest member threshold (None: every member uses the default)."""
    heads = [s.router_head for s in specs]
    if heads[0] is None:
        return None
    thresholds = [h["threshold"] for h in heads if h is not None and h.get("threshold") is not None]
    return {**heads[0], "threshold": min(thresholds) if thresholds else None}


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))
