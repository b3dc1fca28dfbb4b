"""Run every method over the held-out questions of one or more built datasets and score them."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data.build import write_jsonl
from ..data.records import ANSWERABLE, OFF_TOPIC, UNANSWERABLE
from ..device import DeviceConfig
from ..inputs import InputError, checkpoint_folder, dataset_folder, output_folder
from ..models import DEFAULT_MODEL
from ..thresholds import refusal_scores
from .artifacts import MethodRecipe, compile_all
from .backends import Backend, Reply
from .methods import METHODS, Artifact
from .scoring import best_over, contains, exact_match, looks_like_refusal, token_f1

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    data: list[str]  # folders written by `doc2atom data build` (teacher targets not needed)
    out: str = "runs/eval"
    checkpoint: str | None = None  # doc2atom checkpoint: doc2atom and doc2atom_optimize
    d2l_atom_checkpoint: str | None = None  # `method: d2l_atom` checkpoint, same budget
    d2l_raw_checkpoint: str | None = None  # `method: d2l_atom` trained on `--atomizer chunks` data
    model: str | None = None  # base model (default: the checkpoint's, else the packaged default)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    backend: str = "served"  # "served" (vllm serve --plugin doc2atom) or "transformers" (in process)
    split: str = "test"
    limit: int | None = None  # documents per dataset, sampled deterministically
    max_tokens: int = 32
    concurrency: int = 4  # requests in flight (served backend)
    max_lora_rank: int = 64
    top_k: int = 8
    threshold: float | None = None  # None: the banks' calibrated threshold (else 0.5)
    seed: int = 0
    refine_steps: int = 8  # doc2atom_optimize: refinement steps per atom
    refine_lr: float = 1e-3
    serve_args: list[str] = field(default_factory=list)  # extra `vllm serve` arguments, e.g. ["--dtype", "float32"]
    # the base model of every compile and of the transformers backend (`training.device`): auto = the GPU in
    # bfloat16 when torch sees one, else the CPU in float32; a served backend places its own
    device: str = "auto"
    dtype: str = "auto"
    # per answerable question: the mean NLL of its first gold answer as the reply, teacher-forced through the
    # method in process (vLLM's CPU LoRA kernels cannot score a prompt): smoother than containment, it shows
    # knowledge too weak to be generated
    gold_nll: bool = True


@dataclass
class Item:
    dataset: str
    document_id: str
    question_id: str
    question: str
    kind: str
    answers: list[str]


def load_items(folder: str | Path, split: str, limit: int | None, seed: int) -> tuple[str, dict[str, str], list[Item]]:
    """(dataset name, held-out documents, their questions): `limit` documents chosen by a seeded hash."""
    folder = dataset_folder(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    name = Path(str(manifest["config"]["source"])).stem
    documents = {}
    with open(folder / "documents.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["split"] == split:
                documents[doc["id"]] = doc["text"]
    chosen = sorted(documents, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())[:limit]
    documents = {d: documents[d] for d in chosen}
    items = []
    with open(folder / "questions.jsonl", encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            if q["document_id"] in documents:
                items.append(Item(name, q["document_id"], q["id"], q["question"], q["kind"], q["answers"]))
    if not items:
        raise InputError(f"dataset {folder} has no {split} questions: choose another split, or build a "
                         "dataset with `doc2atom data build`")
    return name, documents, items


def recipes_for(config: EvalConfig, model_dir: Path,
                device: DeviceConfig | None = None) -> tuple[dict[str, MethodRecipe], dict[str, str]]:
    """What to compile for each requested method (on `device`), and why a method is skipped (a missing
    checkpoint)."""
    placed = {"device": (device or DeviceConfig()).device, "dtype": (device or DeviceConfig()).dtype}
    checkpoints = {"doc2atom": config.checkpoint, "doc2atom_optimize": config.checkpoint,
                   "d2l_atom": config.d2l_atom_checkpoint, "d2l_raw": config.d2l_raw_checkpoint}
    recipes, skipped = {}, {}
    for method in config.methods:
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        entry = METHODS[method]
        if entry.artifact is Artifact.NONE:
            continue
        if entry.study:
            recipes[method] = MethodRecipe(None, mode="study", model=str(model_dir),
                                           monolithic=entry.artifact is Artifact.MONOLITHIC,
                                           reranker="shipped" if entry.reranked else "none", **placed)
            continue
        if not checkpoints[method]:
            skipped[method] = "no checkpoint given"
            continue
        recipes[method] = MethodRecipe(checkpoints[method], mode="optimize" if method == "doc2atom_optimize"
                                       else "amortized", atomizer="chunks" if method == "d2l_raw" else "rules",
                                       refine_steps=config.refine_steps, refine_lr=config.refine_lr, **placed)
    return recipes, skipped


def score(item: Item, reply: Reply) -> dict[str, Any]:
    refused = reply.flagged_refusal or looks_like_refusal(reply.text)
    row = {**asdict(item), "reply": reply.text, "refused": refused, "flagged_refusal": reply.flagged_refusal,
           "seconds": round(reply.seconds, 4), "atoms": reply.atoms, "prompt_tokens": reply.prompt_tokens}
    if item.kind == ANSWERABLE:
        row |= {"f1": best_over(token_f1, reply.text, item.answers), "em": best_over(exact_match, reply.text,
                                                                                        item.answers),
                "contains": best_over(contains, reply.text, item.answers)}
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    answerable = [r for r in rows if r["kind"] == ANSWERABLE]
    refusal = refusal_scores((r["kind"] != ANSWERABLE, r["refused"]) for r in rows)
    # The off-topic probes alone (SQuAD v2's unanswerable questions are on-topic: only the model can decline them)
    off_topic = refusal_scores((r["kind"] == OFF_TOPIC, r["refused"]) for r in rows if r["kind"] != UNANSWERABLE)
    called = [r["seconds"] for r in rows if not r["flagged_refusal"]]
    nll = [r["gold_nll"] for r in answerable if r.get("gold_nll") is not None]

    def mean(key: str) -> float | None:
        return round(100 * statistics.fmean(r[key] for r in answerable), 2) if answerable else None

    return {"questions": len(rows), "answerable": len(answerable), "f1": mean("f1"), "em": mean("em"),
            "contains": mean("contains"), "gold_nll": round(statistics.fmean(nll), 3) if nll else None,
            "gold_nll_questions": len(nll), "refusal_precision": round(100 * refusal.precision, 2),
            "refusal_recall": round(100 * refusal.recall, 2), "refusal_f1": round(100 * refusal.f1, 2),
            "should_refuse": refusal.should_refuse, "refused": refusal.refused,
            "off_topic_refusal_f1": round(100 * off_topic.f1, 2),
            "answerable_refused": mean("refused"),
            "latency_median_s": round(statistics.median(called), 3) if called else None,
            "prompt_tokens_mean": round(statistics.fmean(r.get("prompt_tokens", 0) for r in rows if not
                                                         r["flagged_refusal"]), 1) if called else None,
            "latency_p90_s": round(statistics.quantiles(called, n=10)[-1], 3) if len(called) > 1 else None}


def run_eval(config: EvalConfig) -> dict[str, Any]:
    from ..models import resolve_model

    out = output_folder(config.out)  # every input is checked before `out` is created
    device = DeviceConfig.from_flags(config.device, config.dtype)
    datasets = [load_items(folder, config.split, config.limit, config.seed) for folder in config.data]
    documents = {doc_id: text for _, docs, _ in datasets for doc_id, text in docs.items()}
    items = [item for _, _, dataset_items in datasets for item in dataset_items]
    checkpoints = [checkpoint_folder(c) for c in (config.checkpoint, config.d2l_atom_checkpoint,
                                                  config.d2l_raw_checkpoint) if c]
    model_name = config.model or (_trained_on(checkpoints[0]) if checkpoints else DEFAULT_MODEL)
    model_dir = resolve_model(model_name)
    recipes, skipped = recipes_for(config, model_dir, device)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in config.methods if m not in skipped]
    for method, why in skipped.items():
        logger.warning("skipping %s: %s", method, why)
    costs = compile_all(recipes, documents, out, config.max_lora_rank)

    rows: list[dict[str, Any]] = []
    # transformers+PEFT swaps adapters on one shared model: one question at a time
    concurrency = config.concurrency if config.backend == "served" else 1
    with _backend(config, model_dir, out, device) as backend:
        for method in methods:
            rows += _answer_all(backend, method, items, documents, concurrency)
    if config.gold_nll:
        with _backend(replace(config, backend="transformers"), model_dir, out, device) as scorer:
            _score_gold_nll(scorer, rows, documents)
    write_jsonl(out / "replies.jsonl", rows)

    results: dict[str, Any] = {"settings": {**asdict(config), "model_dir": model_dir.name},
                               "device": device.describe(), "skipped": skipped, "methods": {}}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        per_dataset = {name: summarize([r for r in mine if r["dataset"] == name]) for name, _, _ in datasets}
        results["methods"][method] = {"overall": summarize(mine), "datasets": per_dataset, **costs.get(method, {})}
    return results


def _backend(config: EvalConfig, model_dir: Path, work_dir: Path, device: DeviceConfig) -> Backend:
    from .backends import ServedBackend, TransformersBackend

    if config.backend == "served":
        threshold = () if config.threshold is None else ("--doc2atom-threshold", str(config.threshold))
        return ServedBackend(model_dir, work_dir, config.max_tokens, config.max_lora_rank,
                             ("--doc2atom-top-k", str(config.top_k), *threshold, *config.serve_args))
    if config.backend == "transformers":
        return TransformersBackend(model_dir, work_dir, config.max_tokens, config.max_lora_rank, config.top_k,
                                   config.threshold, device)
    raise ValueError(f"unknown backend {config.backend!r} (served or transformers)")


def _answer_all(backend: Backend, method: str, items: list[Item], documents: dict[str, str],
                concurrency: int) -> list[dict[str, Any]]:
    def one(item: Item) -> dict[str, Any]:
        reply = backend.answer(method, item.document_id, documents[item.document_id], item.question)
        return {"method": method, **score(item, reply)}

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(tqdm(pool.map(one, items), total=len(items), desc=f"eval {method}", unit="q"))


def _score_gold_nll(scorer: Any, rows: list[dict[str, Any]], documents: dict[str, str]) -> None:
    """Each answerable row's `gold_nll` (None where the method refuses the question)."""
    for row in tqdm([r for r in rows if r["kind"] == ANSWERABLE and r["answers"]], desc="gold answer NLL",
                    unit="q"):
        row["gold_nll"] = scorer.gold_nll(row["method"], row["document_id"], documents[row["document_id"]],
                                          row["question"], row["answers"][0])


def _trained_on(checkpoint: str | Path) -> str:
    return json.loads((Path(checkpoint) / "checkpoint.json").read_text())["train"]["model"]
