"""`doc2atom compile` under torchrun: every rank fits its share of the documents into the study content cache,
then rank 0 alone runs the one-process compile, which finds every document there and writes the bank.

    torchrun --nproc_per_node N -m training.cli compile DOCS --out BANK

Why through the cache: the fits travel as the files the cache writes anyway (safetensors + JSON, keyed by
content), so the bank comes out of the same code path as a one-process compile, a rerun after a crash skips
the documents already fitted, and a rank that dies leaves no half-written bank (only rank 0 writes one,
atomically). torch.distributed carries only small integers and strings, never pickles: one all-reduce checking
that every rank read the same documents and settings, and counters in the rendezvous store for progress and
the finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vllm_doc2atom.bank import AtomBank

from ..inputs import InputError
from .pipeline import DocumentCompiler, bank_to_add_to, compile_each, compile_with, rate_stats

logger = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # rank 0, its own share done, checks the others' progress this often
QUIET_SECONDS = 60.0  # ... and logs it at least this often (else when a document is done)
RENDEZVOUS_TIMEOUT = timedelta(minutes=30)  # the ranks' start (every rank loads its models first)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job (torchrun's environment variables)."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """None outside torchrun, or under torchrun with one process (then it is a plain compile)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def check_distributable(mode: str, cache: bool) -> None:
    """What a torchrun compile cannot do, refused before any model loads."""
    if mode != "study":
        raise InputError(f"--mode {mode} does not run under torchrun: it makes one compiler pass per atom "
                         "and caches nothing to hand over; run it as one process (only --mode study is "
                         "distributed)")
    if not cache:
        raise InputError("--no-cache does not go with torchrun: the ranks hand their fits to rank 0 through "
                         "the study cache; to recompute every document, point DOC2ATOM_CACHE at an empty "
                         "folder")


def start_rank(ranks: Ranks) -> dist.Store:
    """Share the machine (one GPU per rank when there are GPUs, the CPU cores split between the node's
    ranks), join the process group (gloo on CPU, nccl on GPU) and return this run's counter store."""
    if torch.cuda.is_available():
        if ranks.local_rank >= torch.cuda.device_count():
            raise InputError(f"{ranks.local_world} ranks on this machine but {torch.cuda.device_count()} GPUs: "
                             "give torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(ranks.local_rank)  # "cuda" (--device auto) now means this rank's own GPU
    # torchrun sets OMP_NUM_THREADS=1 for every rank: the node's cores, shared, do better (CPU fits, encoders)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks.local_world))
    store, _, _ = next(dist.rendezvous("env://", timeout=RENDEZVOUS_TIMEOUT))
    store.set_timeout(RENDEZVOUS_TIMEOUT)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.PrefixStore(
        "default_pg", store), rank=ranks.rank, world_size=ranks.world, timeout=RENDEZVOUS_TIMEOUT)
    # torchrun's store outlives a restarted worker group: a fresh prefix per attempt starts its counts at 0
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    logger.info("rank %d of %d (local %d of %d), %d torch threads", ranks.rank, ranks.world, ranks.local_rank,
                ranks.local_world, torch.get_num_threads())
    return dist.PrefixStore(f"doc2atom-compile/{attempt}", store)


def deal(documents: Mapping[str, str], world: int) -> list[list[str]]:
    """Each rank's document ids: sorted longest first (ties by id), dealt back and forth (0..N-1, N-1..0,
    ...), so every rank gets as many documents (±1) and about as many characters. The same on every rank."""
    shares: list[list[str]] = [[] for _ in range(world)]
    ordered = sorted(documents, key=lambda doc_id: (-len(documents[doc_id]), doc_id))
    for i, doc_id in enumerate(ordered):
        turn, seat = divmod(i, world)
        shares[seat if turn % 2 == 0 else world - 1 - seat].append(doc_id)
    order = {doc_id: i for i, doc_id in enumerate(documents)}
    return [sorted(share, key=order.__getitem__) for share in shares]  # each in the order given


def compile_sharded(compile_one: DocumentCompiler, documents: Mapping[str, str], out: str | Path,
                    ranks: Ranks, store: dist.Store, overwrite: bool = False, add: bool = False,
                    load_seconds: float = 0.0) -> tuple[AtomBank | None, dict]:
    """This rank's share into the cache; then, on rank 0 only, the one-process compile of every document
    (all found in the cache) into the bank at `out`. Returns (bank, stats) on rank 0, (None, this rank's
    stats) on the others."""
    try:
        check_same_inputs(compile_one, documents, add)
        if ranks.rank == 0:  # a bank these atoms cannot join: refused before any fit (ends every rank)
            bank_to_add_to(compile_one, out, add)
        start = time.perf_counter()
        share = {doc_id: documents[doc_id] for doc_id in deal(documents, ranks.world)[ranks.rank]}
        progress = Progress(store, len(documents), ranks.rank == 0)
        _, atoms = compile_each(compile_one, share, desc=f"rank {ranks.rank}/{ranks.world}",
                                       done=progress.document_done)
        mine = {"rank": ranks.rank, "documents": len(share), "atoms": atoms,
                "load_seconds": round(load_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
                **compile_one.stats()}
        store.set(f"rank{ranks.rank}", json.dumps(mine))
        store.add("ranks_done", 1)
        if ranks.rank != 0:
            logger.info("rank %d: %d documents (%d atoms) in the study cache; rank 0 writes the bank",
                        ranks.rank, len(share), atoms)
            return None, mine
        progress.wait_for_ranks(ranks.world)
        per_rank = [json.loads(store.get(f"rank{r}")) for r in range(ranks.world)]
        before = compile_one.stats()["stage_seconds"]["cached_documents"]
        written = time.perf_counter()
        bank, stats = compile_with(compile_one, documents, out, overwrite=overwrite, add=add)
        missed = stats["documents"] - (stats["stage_seconds"]["cached_documents"] - before)
        if missed:  # a fit another rank made is not in the cache rank 0 reads
            logger.warning("rank 0 fitted %d documents again that other ranks had fitted: on several "
                           "machines, DOC2ATOM_CACHE must be one shared folder", missed)
        stats = merged_stats(stats, per_rank, time.perf_counter() - start, time.perf_counter() - written,
                             load_seconds)
        logger.info("compiled on %d ranks: %s", ranks.world, stats)
        return bank, stats
    finally:
        dist.destroy_process_group()


def check_same_inputs(compile_one: DocumentCompiler, documents: Mapping[str, str], add: bool) -> None:
    """Every rank must deal the same documents with the same settings (on several machines each reads its own
    files): one all-reduce of a fingerprint's max and -min."""
    texts = sorted((doc_id, hashlib.sha256(text.encode()).hexdigest()) for doc_id, text in documents.items())
    identity = {"documents": texts, "spec": compile_one.spec.__dict__,
                "config": getattr(compile_one, "config", None), "add": add}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    value = int(digest[:15], 16)  # fits in int64
    both = torch.tensor([value, -value], dtype=torch.int64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise InputError("the torchrun ranks read different documents or settings (on several machines: give "
                         "each the same files and flags)")


class Progress:
    """Documents and atoms done over all ranks, counted in the store; rank 0 logs them, atoms/s and ETA."""

    def __init__(self, store: dist.Store, total: int, report: bool) -> None:
        self.store, self.total, self.report = store, total, report
        self.start = self.logged = time.perf_counter()

    def document_done(self, atoms: int) -> None:
        self.store.add("atoms", atoms)
        self.store.add("documents", 1)
        if self.report:
            self.log()

    def wait_for_ranks(self, world: int) -> None:
        """Rank 0, its share done: poll until every rank has finished its share (a rank that fails ends the
        whole torchrun job, so this never waits for a dead rank)."""
        seen = -1
        while self.store.add("ranks_done", 0) < world:
            time.sleep(POLL_SECONDS)
            done = self.store.add("documents", 0)
            if done != seen or time.perf_counter() - self.logged > QUIET_SECONDS:
                self.log()
                seen = done

    def log(self) -> None:
        done, atoms = self.store.add("documents", 0), self.store.add("atoms", 0)
        elapsed = time.perf_counter() - self.start
        eta = f"{elapsed / done * (self.total - done) / 60:.1f} min" if done else "?"
        logger.info("all ranks: %d/%d documents, %d atoms, %.2f atoms/s, ETA %s", done, self.total, atoms,
                    atoms / max(elapsed, 1e-9), eta)
        self.logged = time.perf_counter()


def merged_stats(stats: dict, per_rank: list[dict], seconds: float, bank_seconds: float,
                 load_seconds: float) -> dict:
    """Rank 0's one-process stats, with the rates of the whole job (from the ranks' start to the bank
    written), the stage times summed over ranks (what each rank did in its share) and the fit losses averaged
    over every fitted document."""
    stages: dict[str, float] = {}
    for r in per_rank:
        for name, value in r.get("stage_seconds", {}).items():
            stages[name] = round(stages.get(name, 0) + value, 2)
    merged = {**stats, **rate_stats(stats["documents"], stats["atoms"], seconds, load_seconds),
              "stage_seconds": stages or stats.get("stage_seconds"), "world_size": len(per_rank),
              "rank_seconds": [r["seconds"] for r in per_rank],
              "rank_documents": [r["documents"] for r in per_rank],
              "bank_seconds": round(bank_seconds, 2)}
    fitted = [(r["documents"] - r.get("stage_seconds", {}).get("cached_documents", 0), r) for r in per_rank]
    for name in ("fit_loss_first", "fit_loss_last"):
        weighted = [(n, r[name]) for n, r in fitted if name in r and n > 0]
        if weighted:
            merged[name] = round(sum(n * v for n, v in weighted) / sum(n for n, _ in weighted), 4)
    return merged
