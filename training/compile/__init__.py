"""`doc2atom compile`: documents -> atoms -> micro-LoRAs, gates and keys -> an atom bank.

One module per way of making the factors — `study` (self-study at compile time: any base model, no trained
compiler; the default), `amortized` / `optimize` (a trained memory compiler checkpoint) — and one shared path
from documents to a bank (`pipeline`), which torchrun runs on several processes (`distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from vllm_doc2atom.bank import AtomBank

from ..device import DeviceConfig
from ..inputs import InputError, output_folder
from .amortized import AmortizedCompiler, RefineConfig
from .distributed import Ranks, check_distributable, compile_sharded, start_rank
from .documents import make_atomizer, read_documents
from .pipeline import DocumentCompiler, compile_with, peak_memory_mb
from .study import StudyCompiler, StudyConfig

MODES = ("study", "amortized", "optimize")

__all__ = ["MODES", "AmortizedCompiler", "DeviceConfig", "DocumentCompiler", "RefineConfig", "StudyCompiler",
           "StudyConfig", "compile_documents", "compile_with", "make_atomizer", "make_compiler",
           "peak_memory_mb", "read_documents"]


def make_compiler(mode: str = "study", checkpoint: str | Path | None = None, model_dir: str | Path | None = None,
                  refine: RefineConfig | None = None, study: StudyConfig | None = None,
                  atomizer: str = "rules", routing_text: str | None = None,
                  reranker: str | None = "shipped", device: DeviceConfig | None = None) -> DocumentCompiler:
    """The document compiler of a mode. study: model_dir (default: the packaged default model) and the
    reranker its banks are routed with (study_routing.study_router); amortized and optimize: a checkpoint
    (default: the shipped one) and its base model, stage 1 only. routing_text: see make_atomizer (default:
    what the reranker reads, else "atom"). device: where the base model runs (default: the CPU, float32)."""
    if mode == "study":
        from ..models import DEFAULT_MODEL, resolve_model
        from .study_routing import check_reranker

        check_reranker(reranker)
        return StudyCompiler(resolve_model(model_dir or DEFAULT_MODEL), study, atomizer,
                             routing_text=routing_text, reranker=reranker, device=device)
    if mode in ("amortized", "optimize"):
        from ..amortized.shipped import shipped_checkpoint

        return AmortizedCompiler(checkpoint or shipped_checkpoint(), model_dir, mode, refine, atomizer,
                                 routing_text or "atom", device=device)
    raise ValueError(f"unknown compile mode {mode!r} (choose from {', '.join(MODES)})")


def compile_documents(documents: Mapping[str, str], out: str | Path, mode: str = "study",
                      checkpoint: str | Path | None = None, model_dir: str | Path | None = None,
                      overwrite: bool = False, refine: RefineConfig | None = None,
                      study: StudyConfig | None = None, atomizer: str = "rules",
                      add: bool = False, routing_text: str | None = None, reranker: str | None = "shipped",
                      device: DeviceConfig | None = None) -> tuple[AtomBank | None, dict]:
    """Compile documents into a bank at `out` (with `add`: into the existing bank there). Returns the bank and
    its stats (timings, atoms/s, bytes per atom, peak memory, device and dtype, and the mode's own). Raises
    InputError, before loading any model, when there is no document to compile or `out` is a file (with `add`:
    not a bank).
    Under torchrun (`distributed`), every rank compiles its share and rank 0 writes the bank: the other ranks
    return (None, their own stats)."""
    if not any(text.strip() for text in documents.values()):
        raise InputError("nothing to compile: no document has any text (empty documents are skipped)")
    output_folder(out, "bank folder")
    ranks = Ranks.from_env()
    if ranks is not None:
        check_distributable(mode, study.cache if study else True)
    if add and Path(out).exists():
        AtomBank.load(out, verify=False)  # the bank to add to: a BankError now, not after loading the model
    start = time.perf_counter()
    store = start_rank(ranks) if ranks is not None else None  # threads and GPU chosen before the models load
    compile_one = make_compiler(mode, checkpoint, model_dir, refine, study, atomizer, routing_text, reranker,
                                device)
    if ranks is not None:
        return compile_sharded(compile_one, documents, out, ranks, store, overwrite=overwrite, add=add,
                               load_seconds=time.perf_counter() - start)
    return compile_with(compile_one, documents, out, overwrite=overwrite, add=add,
                        load_seconds=time.perf_counter() - start)
