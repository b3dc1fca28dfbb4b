"""`doc2atom train`: multi-objective distillation of the memory compiler and the router.

One readable loop. Each step samples answerable questions (with their documents' atoms) and probes:
    atoms --compiler--> A, B, gates        questions, atom texts --projections--> cosine --head--> router weights
    composition per question: gold atoms (curriculum start) or gold ∪ top-K routed, each scaled by its weight
    student = frozen base model, last N layers run on cached hidden states with the composed LoRA
and minimises the weighted sum of the named terms in losses.py, logging each one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vllm_doc2atom.bank_interface import ATOM_TYPES, Target
from vllm_doc2atom.composer import stack_factors
from vllm_doc2atom.files import make_readable
from vllm_doc2atom.fingerprint import BaseModelFingerprint

from . import losses
from .checkpoint import CHECKPOINT_VERSION, load_compiler, read_checkpoint_meta
from .data.records import ANSWERABLE
from .model import CompilerConfig, MemoryCompiler
from .prepared import AtomTable, QuestionItem, cache_key, load_prepared, save_prepared
from .student import AtomInputs, LoRAHooks, atom_features, encode_students, run_last_layers

logger = logging.getLogger(__name__)


@dataclass
class LossWeights:
    answer_ce: float = 1.0  # teacher's answer tokens
    teacher_kl: float = 1.0  # teacher's top-k distribution
    routing: float = 1.0  # BCE on gold/supporting vs distractor atoms (and every atom for probes)
    suppression: float = 0.05  # composed-update size on probes
    protection: float = 0.1  # KL to the base model on unrelated prompts
    gate_l1: float = 0.01
    consistency: float = 0.1  # gold alone vs gold + distractors
    conflict: float = 0.1
    confidence: float = 0.01


@dataclass
class TrainConfig:
    data: str  # a dataset built by `doc2atom data build --model ...` (it has teacher targets)
    model: str = "smollm2-135m-instruct"  # base model folder or packaged name (must be the teacher's)
    out: str = "runs/doc2atom"
    method: str = "doc2atom"  # "doc2atom" (routed atoms) or "d2l_atom" (all atoms of the document, no routing)
    modules: list[str] = field(default_factory=lambda: ["down_proj"])  # adapted linears
    adapted_layers: int = 4  # the last N layers get micro-LoRAs
    micro_rank: int = 4
    encoder_layer: int = 8  # base-model layer whose hidden states (of the atom's tokens) the compiler reads
    hidden: int = 512  # compiler trunk width
    slot_dim: int = 64  # attention size of the compiler's token-reading slots
    steps: int = 300
    batch_size: int = 8  # answerable questions per step (plus half as many probes)
    lr: float = 1e-3
    top_k: int = 4  # atoms composed per question once the curriculum has grown K
    gold_only_fraction: float = 0.3  # curriculum: this first share of steps composes gold atoms only, no robustness
    gold_token_weight: float = 4.0  # answer_ce/teacher_kl weight of the reply tokens that spell the gold answer
    eval_every: int = 50
    save_every: int = 100
    max_train_questions: int | None = None
    cache_prepared: bool = True  # keep the frozen inputs in OUT/prepared/: a --resume skips their minutes
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        data["weights"] = LossWeights(**data.get("weights", {}))
        return cls(**data)


# ---- data ---------------------------------------------------------------------------------------------------


def prepare(config: TrainConfig, model, tokenizer, encoder) -> tuple[AtomTable, list[QuestionItem]]:
    """Load a built dataset and compute every frozen input once (features, embeddings, student states)."""
    from .data.teacher import load_teacher_targets
    from .student import student_prompt_ids

    data = Path(config.data)
    documents = {d["id"]: d for d in _jsonl(data / "documents.jsonl")}
    atoms = list(_jsonl(data / "atoms.jsonl"))
    questions = [q for q in _jsonl(data / "questions.jsonl") if q["split"] in ("train", "validation")]
    if config.max_train_questions:
        questions = questions[: config.max_train_questions]
    used_docs = {q["document_id"] for q in questions}
    atoms = [a for a in atoms if a["document_id"] in used_docs]
    first_seen = {d: i for i, d in enumerate(dict.fromkeys(a["document_id"] for a in atoms))}
    atoms.sort(key=lambda a: first_seen[a["document_id"]])  # each document's atoms on consecutive rows, in order
    targets = load_teacher_targets(data / "teacher")

    ids = [a["id"] for a in atoms]
    row = {atom_id: i for i, atom_id in enumerate(ids)}
    document_rows: dict[str, list[int]] = {}
    for i, a in enumerate(atoms):
        document_rows.setdefault(a["document_id"], []).append(i)
    features = AtomInputs.cat([
        atom_features(model, tokenizer, documents[doc_id]["text"], [tuple(atoms[r]["span"]) for r in rows],
                      config.encoder_layer)
        for doc_id, rows in tqdm(document_rows.items(), desc="atom features", unit="doc")])
    group_names = sorted({a["conflict_group"] for a in atoms if a.get("conflict_group")})
    table = AtomTable(
        ids=ids, document_rows=document_rows, features=features,
        text_embeddings=torch.from_numpy(encoder.encode([a.get("retrieval_text") or a["text"] for a in atoms])),
        confidence=torch.tensor([float(a["confidence"]) for a in atoms]),
        groups=torch.tensor([group_names.index(a["conflict_group"]) if a.get("conflict_group") else -1
                             for a in atoms]),
        types=torch.tensor([ATOM_TYPES.index(a["type"]) for a in atoms], dtype=torch.long),
        answer_bearing=torch.tensor([float(a["answer_bearing"]) for a in atoms]))

    start_layer = model.config.num_hidden_layers - config.adapted_layers
    answerable = [q for q in questions if q["kind"] == ANSWERABLE and q["id"] in targets and q["labels"]["gold"]]
    students = {s.question_id: s for s in encode_students(
        model, tokenizer, [(q["id"], q["question"], q["answers"]) for q in answerable], targets, start_layer)}
    embeddings = torch.from_numpy(encoder.encode([q["question"] for q in questions]))
    items = []
    for q, embedding in zip(questions, embeddings):
        if q["kind"] == ANSWERABLE and q["id"] not in students:
            continue  # no teacher target or no gold atom: nothing to distil
        prompt_hidden = None
        if q["kind"] != ANSWERABLE:
            with torch.no_grad():
                ids_ = torch.tensor([student_prompt_ids(tokenizer, q["question"])])
                prompt_hidden = model(input_ids=ids_, output_hidden_states=True).hidden_states[start_layer][0]
        labels = q["labels"]
        items.append(QuestionItem(
            id=q["id"], document_id=q["document_id"], kind=q["kind"], split=q["split"],
            positives=[row[a] for a in labels["gold"] + labels["supporting"] if a in row],
            gold=[row[a] for a in labels["gold"] if a in row], embedding=embedding,
            student=students.get(q["id"]), prompt_hidden=prompt_hidden))
    return table, items


# ---- one step -----------------------------------------------------------------------------------------------


PROTECTED_POSITIONS = 8  # knowledge protection compares the last positions of each unrelated prompt


class Distiller:
    """Holds the frozen base model (with LoRA hooks) and the trainable compiler; computes the losses."""

    def __init__(self, config: TrainConfig, model, compiler: MemoryCompiler, table: AtomTable) -> None:
        self.config, self.model, self.compiler, self.table = config, model, compiler, table
        self.targets = compiler.config.target_list()
        self.start_layer = model.config.num_hidden_layers - config.adapted_layers
        self.hooks = LoRAHooks(model, self.targets)

    def losses(self, answerable: list[QuestionItem], probes: list[QuestionItem], stage: int, k: int,
               rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """Every term for one global batch; with world > 1, this rank's share (see the note below)."""
        cfg, table = self.config, self.table
        questions = answerable + probes
        rows = sorted({r for q in questions for r in table.document_rows[q.document_id]})
        local = {r: i for i, r in enumerate(rows)}
        a, b, gates = self.compiler(table.features[rows])
        keys = self.compiler.keys(table.text_embeddings[rows])  # [n, K]
        queries = self.compiler.queries(torch.stack([q.embedding for q in questions]))  # [q, K]
        logits = self.compiler.head(queries @ keys.T, *table.metadata(rows))  # [q, n]: all batch atoms compete
        weights = torch.sigmoid(logits)
        labels = torch.zeros_like(logits)
        for i, q in enumerate(questions):
            labels[i, [local[r] for r in q.positives]] = 1.0
        out: dict[str, torch.Tensor] = {}
        if cfg.method == "doc2atom":
            out["routing"] = losses.routing_bce(logits, labels, positive_weight=5.0)
            out["conflict"] = sum((losses.conflict_exclusivity(weights[i], table.groups[rows])
                                   for i in range(len(questions))), weights.new_zeros(()))
        out["gate_l1"] = losses.gate_l1(gates)
        out["confidence"] = losses.confidence_alignment(gates, table.confidence[rows])

        # The student forwards are the expensive part: a data-parallel rank runs only its share of the
        # questions, summing and dividing by GLOBAL counts (x world, since gradients are averaged over ranks).
        selections = [self._select(q, weights[i], local, stage, k) for i, q in enumerate(answerable)]
        mine = list(range(rank, len(answerable), world))
        own = [answerable[i] for i in mine]
        tokens_total = float(_token_weights(answerable, cfg.gold_token_weight).sum()) / world
        if own:
            student_logits = self._student_logits(own, [selections[i] for i in mine], a, b, gates)
            token_weights = _token_weights(own, cfg.gold_token_weight)
            out["answer_ce"] = losses.answer_ce(student_logits, torch.cat([q.student.answer_tokens for q in own]),
                                                tokens_total, token_weights)
            out["teacher_kl"] = losses.teacher_kl(student_logits, torch.cat([q.student.topk_ids for q in own]),
                                                  torch.cat([q.student.topk_logprobs for q in own]), tokens_total,
                                                  token_weights)
        if stage >= 1:
            if cfg.method == "doc2atom" and own:
                gold_only = [[(local[r], weights[i, local[r]]) for r in answerable[i].gold] for i in mine]
                out["consistency"] = losses.symmetric_kl(
                    self._student_logits(own, gold_only, a, b, gates), student_logits,
                    sum(len(q.student.answer_tokens) for q in answerable) / world)
            if probes:
                sizes = sum(a[t].pow(2).sum((-1, -2)) * b[t].pow(2).sum((-1, -2)) * gates[:, j].pow(2)
                            for j, t in enumerate(self.targets))  # [n]
                # Relative to the batch's mean atom size: scale-free, so it cannot swamp the other terms.
                sizes = sizes / sizes.detach().mean().clamp(min=1e-12)
                offset = len(answerable)
                out["suppression"] = torch.stack([
                    losses.adapter_norm(weights[offset + i], sizes, torch.ones_like(sizes))
                    for i in range(len(probes))]).mean()
                paired = [(p, selections[i % len(selections)]) for i, p in enumerate(probes)]
                positions_total = sum(min(PROTECTED_POSITIONS, p.prompt_hidden.shape[0]) for p in probes) / world
                if paired[rank::world]:
                    out["protection"] = self._protection(paired[rank::world], a, b, gates, positions_total)
        return out

    def _select(self, q: QuestionItem, weights: torch.Tensor, local: dict[int, int], stage: int,
                k: int) -> list[tuple[int, torch.Tensor]]:
        """(local atom row, scale) composed for one answerable question."""
        own = [local[r] for r in self.table.document_rows[q.document_id]]
        if self.config.method == "d2l_atom":
            return [(i, weights.new_ones(())) for i in own]  # the whole document, as one monolithic adapter
        gold = [local[r] for r in q.gold]
        if stage == 0:
            return [(i, weights.new_ones(())) for i in gold]
        ranked = sorted(own, key=lambda i: -weights[i].item())[:k]
        return [(i, weights[i]) for i in dict.fromkeys(gold + ranked)]

    def _compose(self, selections, a, b, gates) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample LoRA factors, padded to the largest selection with zero scales."""
        width = max(len(s) for s in selections)
        factors = {}
        for j, target in enumerate(self.targets):
            rows = torch.tensor([[i for i, _ in s] + [0] * (width - len(s)) for s in selections])
            zero = gates.new_zeros(())
            scale = torch.stack([torch.stack([w for _, w in s] + [zero] * (width - len(s)))
                                 for s in selections])  # [b, width]
            scale = scale * gates[rows, j] * self.compiler.config.lora_scaling
            factors[target] = stack_factors(a[target][rows], b[target][rows], scale)
        return factors

    def _run(self, hiddens: list[torch.Tensor], factors) -> torch.Tensor:
        width = max(h.shape[0] for h in hiddens)
        batch = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[0])) for h in hiddens])
        with self.hooks.active(factors):
            return run_last_layers(self.model, batch, self.start_layer)

    def _student_logits(self, answerable, selections, a, b, gates) -> torch.Tensor:
        """Logits at every answer position of every question: [P, V]."""
        hidden = self._run([q.student.hidden for q in answerable], self._compose(selections, a, b, gates))
        picked = torch.cat([hidden[i, q.student.answer_positions] for i, q in enumerate(answerable)])
        return self.model.lm_head(picked)

    def _protection(self, paired, a, b, gates, denominator: float) -> torch.Tensor:
        """Adapters composed for some questions must not change the model on unrelated prompts (probes)."""
        hiddens = [p.prompt_hidden for p, _ in paired]
        tail = [slice(max(0, h.shape[0] - PROTECTED_POSITIONS), h.shape[0]) for h in hiddens]
        adapted = self._run(hiddens, self._compose([s for _, s in paired], a, b, gates))
        with torch.no_grad():
            base = self._run(hiddens, None)
        pick = lambda h: self.model.lm_head(torch.cat([h[i, s] for i, s in enumerate(tail)]))  # noqa: E731
        return losses.logits_kl(pick(base), pick(adapted), denominator)


def _token_weights(questions: list[QuestionItem], gold_weight: float) -> torch.Tensor:
    """Loss weight of every answer token of these questions: `gold_weight` on the fact's tokens, else 1."""
    return 1.0 + (gold_weight - 1.0) * torch.cat([q.student.fact_mask for q in questions]).float()


# ---- training loop ------------------------------------------------------------------------------------------


def _prepared_inputs(config: TrainConfig, model_dir: str, model, tokenizer, encoder,
                     write: bool) -> tuple[AtomTable, list[QuestionItem]]:
    """`prepare`'s result, from the run folder's cache when the data, model and settings are unchanged."""

    if not config.cache_prepared:
        return prepare(config, model, tokenizer, encoder)
    folder, key = Path(config.out) / "prepared", cache_key(config, model_dir, encoder.identity)
    cached = load_prepared(folder, key)
    if cached is not None:
        return cached
    table, items = prepare(config, model, tokenizer, encoder)
    if write and items:
        save_prepared(folder, key, table, items)
    return table, items


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train; returns the checkpoint folder (OUT/checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_doc2atom.encoders import SentenceTransformerEncoder

    from .models import PACKAGED_MODELS, prepare_model

    rank, world = _init_distributed()
    torch.manual_seed(config.seed)
    model_dir = str(prepare_model(config.model)) if config.model in PACKAGED_MODELS else config.model
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    resume = resume and (checkpoint / "checkpoint.json").is_file()
    if resume:
        read_checkpoint_meta(checkpoint)  # fail before the minutes of preparation, not after
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    encoder = SentenceTransformerEncoder()
    table, items = _prepared_inputs(config, model_dir, model, tokenizer, encoder, write=rank == 0)
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
        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.method}", unit="step", disable=not lead)
        while step < config.steps:
            start = time.perf_counter()
            stage, k = curriculum(config, step)
            # Seeded by (seed, step): every rank draws the same global batch, and a resumed run the same batches.
            rng = random.Random(config.seed * 1_000_003 + step)
            answerable = rng.sample(train_answerable, min(config.batch_size, len(train_answerable)))
            probes = rng.sample(train_probes, min(config.batch_size // 2, len(train_probes))) if stage else []
            terms = distiller.losses(answerable, probes, stage, k, rank, world)
            total = sum(getattr(config.weights, name) * value for name, value in terms.items())
            optimizer.zero_grad()
            total.backward()
            if world > 1:
                _average_gradients(compiler)
            torch.nn.utils.clip_grad_norm_(compiler.parameters(), 1.0)
            optimizer.step()
            step += 1
            logged = _mean_over_ranks({n: t.detach() for n, t in terms.items()}, term_names, world)
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
                logger.info("step %d validation: %s", step, {c: round(values[c], 4) for c in VALIDATION_COLUMNS})
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


def _init_distributed() -> tuple[int, int]:
    """(rank, world size): torchrun sets WORLD_SIZE; gloo works on CPUs, nccl is used on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def _average_gradients(module: torch.nn.Module) -> None:
    """Every rank ends with the mean of the ranks' gradients (parameters stay identical everywhere)."""
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= torch.distributed.get_world_size()


def _mean_over_ranks(values: dict[str, torch.Tensor], names: list[str], world: int) -> dict[str, float]:
    """Per-term values as one process with the whole batch would have computed them (absent = no rank has it)."""
    stacked = torch.stack([values[n].float() if n in values else torch.zeros(()) for n in names])
    present = torch.tensor([float(n in values) for n in names])
    if world > 1:
        torch.distributed.all_reduce(stacked)
        torch.distributed.all_reduce(present)
        stacked = stacked / world
    return {n: v for n, v, p in zip(names, stacked.tolist(), present.tolist()) if p > 0}


def curriculum(config: TrainConfig, step: int) -> tuple[int, int]:
    """(stage, K): gold atoms only first; then K grows from 2 to top_k and the robustness terms switch on."""
    warm = int(config.gold_only_fraction * config.steps)
    if step < warm:
        return 0, 0
    progress = (step - warm) / max(1, config.steps - warm)
    return 1, min(config.top_k, 2 + int(progress * (config.top_k - 1)))


VALIDATION_COLUMNS = ["answer_ce_routed", "answer_ce_gold", "answer_ce_document", "answer_ce_base", "fact_ce_gold",
                      "fact_ce_base", "gold_recall", "false_refusals", "probe_refusals"]


@torch.no_grad()
def validate(distiller: Distiller, items: list[QuestionItem], k: int, threshold: float = 0.5) -> dict[str, float]:
    """Inference-like check on held-out documents: route each question over its document's atoms (kept: weight
    >= threshold, at most k), then answer CE with those atoms, with the gold atoms, with all the document's atoms
    at weight 1 (what the d2l_atom baseline serves), and with no adapter. fact_ce_* is the CE of the reply tokens
    that spell the gold answer only: the fact itself, without the sentence around it."""
    table, compiler = distiller.table, distiller.compiler
    answerable = [q for q in items if q.student is not None][:64]
    probes = [q for q in items if q.student is None][:64]
    routed, recalled = [], 0
    for q in answerable + probes:
        own = table.document_rows[q.document_id]
        keys = compiler.keys(table.text_embeddings[own])
        weights = torch.sigmoid(compiler.head(compiler.queries(q.embedding[None]) @ keys.T, *table.metadata(own)))[0]
        kept = [own[i] for i in weights.argsort(descending=True)[:k].tolist() if weights[i] >= threshold]
        routed.append((q, kept, {r: weights[own.index(r)] for r in kept}))
        recalled += q.student is not None and bool(set(q.gold) & set(kept))
    out = {"gold_recall": recalled / max(1, len(answerable)),
           "false_refusals": sum(not kept for q, kept, _ in routed if q.student is not None) / max(1, len(answerable)),
           "probe_refusals": sum(not kept for q, kept, _ in routed if q.student is None) / max(1, len(probes))}
    with_atoms = [(q, kept, w) for q, kept, w in routed if q.student is not None and kept]
    if not answerable:
        return {**out, **{c: math.nan for c in VALIDATION_COLUMNS if c not in out}}
    rows = sorted({r for q in answerable for r in table.document_rows[q.document_id]})
    local = {r: i for i, r in enumerate(rows)}
    a, b, gates = compiler(table.features[rows])
    tokens = torch.cat([q.student.answer_tokens for q in answerable])
    one = gates.new_ones(())
    gold = distiller._student_logits(answerable, [[(local[r], one) for r in q.gold] for q in answerable], a, b, gates)
    document = distiller._student_logits(
        answerable, [[(local[r], one) for r in table.document_rows[q.document_id]] for q in answerable], a, b, gates)
    hidden = distiller._run([q.student.hidden for q in answerable], None)
    base = distiller.model.lm_head(torch.cat([hidden[i, q.student.answer_positions] for i, q in enumerate(answerable)]))
    out["answer_ce_gold"] = float(losses.answer_ce(gold, tokens))
    out["answer_ce_document"] = float(losses.answer_ce(document, tokens))
    out["answer_ce_base"] = float(losses.answer_ce(base, tokens))
    fact = torch.cat([q.student.fact_mask for q in answerable])
    for name, logits in (("fact_ce_gold", gold), ("fact_ce_base", base)):
        out[name] = float(losses.answer_ce(logits[fact], tokens[fact])) if fact.any() else math.nan
    if with_atoms:
        logits = distiller._student_logits([q for q, _, _ in with_atoms],
                                           [[(local[r], w[r]) for r in kept] for _, kept, w in with_atoms], a, b, gates)
        out["answer_ce_routed"] = float(losses.answer_ce(logits, torch.cat([q.student.answer_tokens
                                                                            for q, _, _ in with_atoms])))
    else:
        out["answer_ce_routed"] = math.nan
    return out


# ---- checkpoints ---------------------------------------------------------------------------------------------




def save_checkpoint(path: Path, compiler: MemoryCompiler, optimizer: torch.optim.Optimizer, step: int,
                    config: TrainConfig) -> None:
    """safetensors (weights, optimizer moments) + JSON (configs, step), swapped in atomically."""
    tensors = {f"model.{name}": p.detach().contiguous() for name, p in compiler.state_dict().items()}
    names = {id(p): name for name, p in compiler.named_parameters()}
    optim_steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                tensors[f"optim.{names[id(p)]}.exp_avg"] = state["exp_avg"].contiguous()
                tensors[f"optim.{names[id(p)]}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
                optim_steps[names[id(p)]] = float(state["step"])
    meta = {"format": "doc2atom-checkpoint", "format_version": CHECKPOINT_VERSION, "step": step,
            "compiler": compiler.config.to_dict(), "train": _jsonable(asdict(config)),
            "encoder_layer": config.encoder_layer, "optimizer_steps": optim_steps}
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "compiler.safetensors"))
    make_readable(tmp / "compiler.safetensors")
    (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
    _swap_in(tmp, path)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace the folder `path` by `tmp` with renames only: a reader sees the old or the new, never a mix."""
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """An inference-only copy (weights + configs, no optimizer moments: a third of the size) for shipping."""
    source, out = Path(source), Path(out)
    meta = json.loads((source / "checkpoint.json").read_text())
    tensors = {k: v for k, v in load_file(str(source / "compiler.safetensors")).items() if k.startswith("model.")}
    # Shipped files must not name the trainer's machine: keep only the folder names of data and out.
    train = {**meta["train"], "data": Path(meta["train"]["data"]).name, "out": Path(meta["train"]["out"]).name}
    meta = {**meta, "train": train, "optimizer_steps": {},
            "exported_from": f"{source.resolve().parent.name}@step{meta['step']}"}
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "compiler.safetensors"))
    make_readable(tmp / "compiler.safetensors")
    (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
    for extra in out.glob("*") if out.exists() else []:  # keep what else lives there (a card)
        if not (tmp / extra.name).exists():
            shutil.copy2(extra, tmp / extra.name)
    _swap_in(tmp, out)
    return out


def load_training_state(path: Path, compiler: MemoryCompiler, optimizer: torch.optim.Optimizer) -> int:
    loaded, meta = load_compiler(path)
    compiler.load_state_dict(loaded.state_dict())
    tensors = load_file(str(path / "compiler.safetensors"))
    for name, p in compiler.named_parameters():
        if f"optim.{name}.exp_avg" in tensors:
            optimizer.state[p] = {"step": torch.tensor(meta["optimizer_steps"][name]),
                                  "exp_avg": tensors[f"optim.{name}.exp_avg"],
                                  "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"]}
    return int(meta["step"])


def _append_csv(path: Path, header: list[str], row: list[Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
