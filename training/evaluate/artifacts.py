"""What each method serves, compiled from the held-out documents: per-document atom banks for the routed
methods, one monolithic PEFT LoRA per document for the Doc-to-LoRA baselines (all of its atoms, weight 1).

Each method compiles in a fresh process, so its peak memory is measured alone.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from vllm_doc2atom.files import swap_in

from .methods import METHODS, Artifact

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodRecipe:
    checkpoint: str | None  # None: self-study
    mode: str = "amortized"
    atomizer: str = "rules"
    refine_steps: int = 8  # optimize mode (RefineConfig)
    refine_lr: float = 1e-3
    model: str | None = None  # study mode: the base model
    monolithic: bool = False  # study mode: one adapter per document (the Doc-to-LoRA baseline)
    reranker: str = "shipped"  # study mode: the reranker its banks are routed with ("none": stage 1 only)
    device: str = "cpu"  # where the base model compiles (a resolved training.device.DeviceConfig's fields)
    dtype: str = "float32"


def artifact_name(method: str, document_id: str) -> str:
    """Bank name (routed) or LoRA name (monolithic) of one document: plain characters whatever the id."""
    return f"{method}/{hashlib.sha256(document_id.encode()).hexdigest()[:16]}"


def lora_name(method: str, document_id: str) -> str:
    return artifact_name(method, document_id).replace("/", "-")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compile_method(method: str, recipe: MethodRecipe, documents: dict[str, str], work_dir: Path,
                   max_rank: int) -> dict:
    """Compile every document for one method under work_dir (banks/ or adapters/); return its costs."""
    from vllm_doc2atom.composer import compose, save_peft_adapter

    from ..compile import AmortizedCompiler, DeviceConfig, RefineConfig, StudyCompiler, peak_memory_mb

    device = DeviceConfig(recipe.device, recipe.dtype)
    if recipe.mode == "study":
        compiler = StudyCompiler(recipe.model, atomizer=recipe.atomizer, monolithic=recipe.monolithic,
                                 reranker=recipe.reranker, device=device)
    else:
        refine = RefineConfig(recipe.refine_steps, recipe.refine_lr)
        compiler = AmortizedCompiler(recipe.checkpoint, mode=recipe.mode, atomizer=recipe.atomizer,
                                     refine=refine, device=device)
    seconds, sizes, dropped = [], [], 0
    for doc_id, text in documents.items():
        start = time.perf_counter()
        compiled = compiler(doc_id, text)
        if compiled is None:
            continue
        artifact = METHODS[method].artifact
        folder_name = "banks" if artifact is Artifact.ROUTED else "monolithic-banks"
        bank_dir = work_dir / folder_name / artifact_name(method, doc_id)
        bank = compiler.create_bank(bank_dir, [compiled], overwrite=True)  # routed: calibrated on its document
        if artifact is Artifact.MONOLITHIC:  # Doc-to-LoRA: the whole document as one adapter, no routing
            adapter = compose(bank, [(row, 1.0) for row in range(len(bank))], max_rank)
            dropped += len(adapter.dropped)
            folder = save_peft_adapter(adapter, work_dir / "adapters" / method)
            target = folder.with_name(lora_name(method, doc_id))
            swap_in(folder, target)
            sizes.append(folder_bytes(target))
        else:  # the document's shard; the bank's query projection is shared by all its documents
            sizes.append(folder_bytes(bank_dir / "shards"))
        seconds.append(time.perf_counter() - start)
    return {"documents": len(seconds), "compile_seconds_per_document": round(sum(seconds) / max(len(seconds), 1), 3),
            "compile_peak_memory_mb": peak_memory_mb(), "bytes_per_document": round(sum(sizes) / max(len(sizes), 1)),
            "atoms_dropped_for_rank": dropped, **compiler.stats(), "checkpoint": recipe.checkpoint, "mode": recipe.mode,
            "atomizer": recipe.atomizer}


def compile_all(recipes: dict[str, MethodRecipe], documents: dict[str, str], work_dir: Path,
                max_rank: int) -> dict[str, dict]:
    costs = {}
    for method, recipe in recipes.items():
        logger.info("compiling %d documents for %s", len(documents), method)
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            costs[method] = pool.submit(compile_method, method, recipe, documents, work_dir, max_rank).result()
        logger.info("%s: %s", method, costs[method])
    return costs
