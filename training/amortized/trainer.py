"""`doc2atom train`: multi-objective distillation of the memory compiler and the router — the loop.

One readable loop. Each step samples answerable questions (with their documents' atoms) and probes:
    atoms --compiler--> A, B, gates     questions, atom texts --projections--> cosine --head--> router weights
    composition per question: gold atoms (curriculum start) or gold ∪ top-K routed, each scaled by its weight
    student = frozen base model, last N layers run on cached hidden states with the composed LoRA
and minimises the weighted sum of the named terms in losses.py (`distill.Distiller`), logging each one.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_doc2atom.bank_interface import Target
from vllm_doc2atom.fingerprint import BaseModelFingerprint

from ..inputs import dataset_folder, output_folder
from .checkpoint import load_training_state, read_checkpoint_meta, save_checkpoint
from .config import LossWeights, TrainConfig
from .distill import Distiller
from .distributed import average_gradients, init_distributed, mean_over_ranks
from .memory_compiler import CompilerConfig, MemoryCompiler
from .prepare import prepared_inputs
from .validation import VALIDATION_COLUMNS, validate

logger = logging.getLogger(__name__)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train; returns the checkpoint folder (OUT/checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_doc2atom.encoders import SentenceTransformerEncoder

    from ..models import resolve_model

    out = output_folder(config.out)  # inputs first: fail before creating OUT or loading anything
    checkpoint = out / "checkpoint"
    resume = resume and (checkpoint / "checkpoint.json").is_file()
    if resume:
        read_checkpoint_meta(checkpoint)  # fail before the minutes of preparation, not after
    dataset_folder(config.data)
    model_dir = str(resolve_model(config.model))
    rank, world = init_distributed()
    torch.manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    encoder = SentenceTransformerEncoder()
    table, items = prepared_inputs(config, model_dir, model, tokenizer, encoder, write=rank == 0)
    train_answerable = [q for q in items if q.split == "train" and q.student is not None]
    train_probes = [q for q in items if q.split == "train" and q.student is None]
    validation = [q for q in items if q.split == "validation"]
    if not train_answerable:
        raise ValueError(f"{config.data}: no answerable training question with teacher targets and gold atoms")
    logger.info("training on %d questions + %d probes (%d validation), %d atoms", len(train_answerable),
                len(train_probes), len(validation), len(table.ids))

    base = BaseModelFingerprint.from_model_dir(model_dir, name=Path(model_dir).name)
    first = base.num_layers - config.adapted_layers
    compiler_config = CompilerConfig(
        base_model=base.to_dict(), targets=[Target(m, layer).key for layer in range(first, base.num_layers)
                                            for m in config.modules],
        feature_dim=model.config.hidden_size, text_dim=encoder.dim, key_dim=encoder.dim, hidden=config.hidden,
        slot_dim=config.slot_dim, micro_rank=config.micro_rank)
    compiler = MemoryCompiler(compiler_config)
    optimizer = torch.optim.AdamW(compiler.parameters(), lr=config.lr)
    step = 0
    if resume:
        step = load_training_state(checkpoint, compiler, optimizer)
        logger.info("resumed from %s at step %d", checkpoint, step)
    distiller = Distiller(config, model, compiler, table)
    metrics_path = out / "metrics.csv"
    term_names = [f.name for f in fields(LossWeights)]
    lead = rank == 0  # only the first rank writes metrics and checkpoints
    with open(metrics_path if lead else os.devnull, "a", newline="") as metrics_file:
        writer = csv.writer(metrics_file)
        if lead and metrics_file.tell() == 0:
            writer.writerow(["step", "stage", "k", "total", *term_names, "seconds"])
        board = _tensorboard(out / "tensorboard") if lead else None
        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.method}", unit="step",
                   disable=not lead)
        while step < config.steps:
            start = time.perf_counter()
            stage, k = curriculum(config, step)
            # Seeded by (seed, step): every rank draws the same global batch, a resumed run the same batches.
            rng = random.Random(config.seed * 1_000_003 + step)
            answerable = rng.sample(train_answerable, min(config.batch_size, len(train_answerable)))
            probes = rng.sample(train_probes, min(config.batch_size // 2, len(train_probes))) if stage else []
            terms = distiller.losses(answerable, probes, stage, k, rank, world)
            total = sum(getattr(config.weights, name) * value for name, value in terms.items())
            optimizer.zero_grad()
            total.backward()
            if world > 1:
                average_gradients(compiler)
            torch.nn.utils.clip_grad_norm_(compiler.parameters(), 1.0)
            optimizer.step()
            step += 1
            logged = mean_over_ranks({n: t.detach() for n, t in terms.items()}, term_names, world)
            logged_total = sum(getattr(config.weights, n) * v for n, v in logged.items())
            writer.writerow([step, stage, k, f"{logged_total:.5f}",
                             *[f"{logged[n]:.5f}" if n in logged else "" for n in term_names],
                             f"{time.perf_counter() - start:.3f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{logged_total:.3f}", ce=f"{logged['answer_ce']:.3f}", stage=stage)
            if board is not None:
                for name, value in {"total": logged_total, **logged}.items():
                    board.add_scalar(f"train/{name}", value, step)
            if not lead:
                continue
            if validation and (step % config.eval_every == 0 or step == config.steps):
                values = validate(distiller, validation, max(k, 2))
                _append_csv(out / "validation.csv", ["step", *VALIDATION_COLUMNS],
                            [step, *[f"{values[c]:.5f}" for c in VALIDATION_COLUMNS]])
                logger.info("step %d validation: %s", step,
                            {c: round(values[c], 4) for c in VALIDATION_COLUMNS})
                if board is not None:
                    for name in VALIDATION_COLUMNS:
                        board.add_scalar(f"validation/{name}", values[name], step)
                metrics_file.flush()
            if step % config.save_every == 0 or step == config.steps:
                save_checkpoint(checkpoint, compiler, optimizer, step, config)
        bar.close()
        if board is not None:
            board.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    logger.info("checkpoint: %s (metrics: %s)", checkpoint, metrics_path)
    return checkpoint


def _tensorboard(path: Path):
    """A TensorBoard writer when tensorboard is installed (it is with the `test` extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def curriculum(config: TrainConfig, step: int) -> tuple[int, int]:
    """(stage, K): gold atoms only first; then K grows from 2 to top_k and the robustness terms switch on."""
    warm = int(config.gold_only_fraction * config.steps)
    if step < warm:
        return 0, 0
    progress = (step - warm) / max(1, config.steps - warm)
    return 1, min(config.top_k, 2 + int(progress * (config.top_k - 1)))


def _append_csv(path: Path, header: list[str], row: list[Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)
