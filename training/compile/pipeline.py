"""The path every compile mode shares: documents -> one DocumentCompiler call per document -> an atom bank
(new, or added to an existing one), with timings, atoms/s and peak memory."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.bank_interface import BankSpec, DocumentAtoms

from ..inputs import InputError, name_list

logger = logging.getLogger(__name__)


class DocumentCompiler(Protocol):
    mode: str
    spec: BankSpec

    def __call__(self, doc_id: str, text: str) -> DocumentAtoms | None: ...

    def create_bank(self, out: str | Path, compiled: list[DocumentAtoms], overwrite: bool = False) -> AtomBank: ...

    def compatible(self, spec: BankSpec) -> bool: ...

    def stats(self) -> dict: ...


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def compile_with(compile_one: DocumentCompiler, documents: Mapping[str, str], out: str | Path,
                 overwrite: bool = False, add: bool = False, load_seconds: float = 0.0) -> tuple[AtomBank, dict]:
    """Compile documents into a bank at `out` (or, with `add`, into the existing bank there, replacing documents
    of the same id; the other shards stay untouched). Returns the bank and timing stats."""
    start = time.perf_counter()
    existing = bank_to_add_to(compile_one, out, add)
    compiled, atoms = compile_each(compile_one, documents)
    if not compiled:  # nothing to write: leave `out` as it was
        raise InputError(f"nothing to compile: no atoms in any document ({name_list(documents)}); give documents "
                         "with sentences of text")
    if existing is not None:
        bank = existing.add_documents(compiled, replace=True)
    else:
        bank = compile_one.create_bank(out, compiled, overwrite=overwrite)
    seconds = time.perf_counter() - start
    stats = {"mode": compile_one.mode, **rate_stats(len(compiled), atoms, seconds, load_seconds),
             "bytes_per_atom": round(_shard_bytes(bank) / max(len(bank), 1)),
             "peak_memory_mb": peak_memory_mb(), **compile_one.stats()}
    logger.info("compiled %s", stats)
    return bank, stats


def bank_to_add_to(compile_one: DocumentCompiler, out: str | Path, add: bool) -> AtomBank | None:
    """With `add`, the existing bank at `out` (None when there is none yet); ValueError when this compile's
    atoms could not join it."""
    existing = AtomBank.load(out) if add and Path(out).exists() else None
    if existing is not None and not compile_one.compatible(existing.spec):
        spec = existing.spec
        raise ValueError(f"bank {out} was compiled with {spec.checkpoint} ({spec.micro_rank=}, "
                         f"{len(spec.targets)} targets) as it was then, which differs from this compile "
                         f"({compile_one.spec.checkpoint}): their atoms could not be routed and composed "
                         "together; compile into a new bank instead")
    return existing


def compile_each(compile_one: DocumentCompiler, documents: Mapping[str, str], desc: str | None = None,
                 done: Callable[[int], None] | None = None) -> tuple[list[DocumentAtoms], int]:
    """One compile_one call per document, under a progress bar: (the documents with atoms, their atom count).
    done(atoms) is called after each document (a torchrun rank reports its progress through it)."""
    start = time.perf_counter()
    compiled, atoms = [], 0
    with tqdm(documents.items(), desc=desc or f"compile ({compile_one.mode})", unit="doc") as bar:
        for doc_id, text in bar:
            result = compile_one(doc_id, text)
            found = 0 if result is None else len(result.atoms)
            if result is not None:
                compiled.append(result)
                atoms += found
            if done is not None:
                done(found)
            bar.set_postfix(atoms=atoms, atoms_per_s=f"{atoms / max(time.perf_counter() - start, 1e-9):.2f}")
    return compiled, atoms


def rate_stats(documents: int, atoms: int, seconds: float, load_seconds: float) -> dict[str, float]:
    """Wall time (model loading included) and per-document / per-atom rates (loading excluded)."""
    return {"documents": documents, "atoms": atoms,
            "seconds": round(seconds + load_seconds, 2), "load_seconds": round(load_seconds, 2),
            "seconds_per_document": round(seconds / max(documents, 1), 3),
            "seconds_per_atom": round(seconds / max(atoms, 1), 3),
            "atoms_per_second": round(atoms / max(seconds, 1e-9), 3)}


def _shard_bytes(bank: AtomBank) -> int:
    return sum(p.stat().st_size for p in (bank.path / "shards").glob("*.safetensors"))
