"""`doc2atom router train`: fine-tune the MiniLM cross-encoder reranker on routing pairs — the loop.

One readable loop: every step takes `batch_size` labelled (question, atom text) pairs of the TRAIN splits,
    pairs --tokenizer--> [B, <=max_length] ids --MiniLM + 1-logit head--> [B] logits --BCE with labels--> loss
then AdamW with linear warmup and decay; MiniLM's word and position embeddings stay frozen (the packaged ones:
never shipped). Afterwards every folder's validation split measures routing as `doc2atom router eval` does
(recall@k of MiniLM cosine, and of the reranker re-ordering MiniLM's top-K, within the question's document and
bank-wide), and the trained tensors (reranker.safetensors) and the card (reranker.json) are swapped into OUT at
once: a folder `doc2atom compile --reranker` takes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_doc2atom.files import atomic_directory, make_readable
from vllm_doc2atom.reranker import CARD, FROZEN, CrossEncoderReranker, new_reranker

from ..inputs import InputError, dataset_folder, output_folder
from .examples import RoutingExample, load_examples
from .pairs import PAIR_TEXTS, Pair, mixed_pairs

logger = logging.getLogger(__name__)


@dataclass
class RerankerTrainConfig:
    data: list[str] = field(default_factory=list)  # folders written by `doc2atom data build`, all mixed
    out: str = "runs/reranker"
    max_pairs: int | None = 20_000  # training pairs (positives + negatives), taken in turn from every folder
    same_document_negatives: int = 3  # per positive: other atoms of the question's document (hard negatives)
    other_document_negatives: int = 1  # per positive: random atoms of other documents (and to fill in)
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    lr: float = 3e-5
    warmup_fraction: float = 0.1
    batch_size: int = 32
    max_length: int = 128  # tokens of question + atom text (longer pairs are cut; atoms are short)
    # MiniLM layers kept (fewer score faster: 8 candidates in ~13 / 19 / 42 ms with 2 / 3 / 6 layers, fp32, 2
    # CPU threads), but 3 layers learnt no ranking in 938 steps where 6 reached 83 % first in 400
    layers: int = 6
    name: str = ""  # the reranker's name in its card and in the banks it calibrates (default: OUT's name)
    text: str = "titled"  # what the reranker reads of an atom: "text" or "titled" (pairs.PAIR_TEXTS)
    rerank_top_k: int = 8  # validation: the reranker re-orders MiniLM's best (the server's stage-1 top-K)
    validate: bool = True  # measure on every folder's validation split (written into the card)
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainedReranker:
    reranker: CrossEncoderReranker
    steps: int
    pairs: int  # pairs seen (steps x batch, the last batch of an epoch may be short)
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / max(self.seconds, 1e-9)


def train_reranker(config: RerankerTrainConfig) -> Path:
    """Train on the TRAIN splits of `config.data`, validate on their validation splits; returns OUT."""
    out = output_folder(config.out, "reranker output folder")  # inputs first: fail before loading anything
    if out.is_dir() and any(out.iterdir()) and not (out / CARD).is_file():
        raise InputError(f"reranker output folder {out} holds other files, which training would replace: "
                         "give a new folder (or a reranker folder to overwrite)")
    if not config.data:
        raise InputError("no dataset given: name at least one folder written by `doc2atom data build`")
    folders = [dataset_folder(folder) for folder in config.data]
    if config.text not in PAIR_TEXTS:
        raise InputError(f"unknown text kind {config.text!r}: choose from {', '.join(PAIR_TEXTS)}")
    train = [load_examples(folder, "train") for folder in folders]  # never validation or test questions
    data = [{"folder": str(folder), "manifest_sha256": _sha256(folder / "manifest.json"),
             "train_questions": len(examples)} for folder, examples in zip(folders, train)]
    trained = fit_reranker(train, config)
    start = time.perf_counter()
    validation = validate(trained.reranker, folders, config) if config.validate else []
    save_trained(out, trained, config, {"data": data, "validation_summary": summary(validation, config.text),
                                        "validation_seconds": round(time.perf_counter() - start, 1),
                                        "validation": validation})
    return out


def fit_reranker(datasets: Sequence[Sequence[RoutingExample]],
                 config: RerankerTrainConfig) -> TrainedReranker:
    """The training loop on the pairs of `datasets` (each a list of training examples)."""
    import torch
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    pairs = mixed_pairs(datasets, config.same_document_negatives, config.other_document_negatives,
                        config.seed, config.max_pairs, config.text)
    if not pairs:
        raise InputError("no training pairs: the datasets have no train questions with gold atoms "
                         "(or max_pairs is below one question's pairs)")
    positives = sum(p.label for p in pairs)
    steps = config.steps or max(1, math.ceil(config.epochs * len(pairs) / config.batch_size))
    logger.info("reranker: %d pairs (%d positive) from %d datasets, %d steps of %d", len(pairs), positives,
                len(datasets), steps, config.batch_size)
    torch.manual_seed(config.seed)  # the new head's initialisation and dropout
    reranker = new_reranker(config.layers, config.max_length, config.text, config.device)
    model = reranker.model
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in FROZEN)  # the embedding tables stay the packaged ones
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * steps), steps)
    batches = _batches(pairs, config.batch_size, random.Random(config.seed))
    model.train()
    seen, start = 0, time.perf_counter()
    bar = tqdm(range(steps), desc="train reranker", unit="step")
    for _ in bar:
        batch = next(batches)
        labels = torch.tensor([p.label for p in batch], device=model.device)  # [B]
        logits = reranker.logits([p.question for p in batch], [p.text for p in batch])  # [B]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        seen += len(batch)
        bar.set_postfix(loss=f"{loss.item():.3f}", pairs_s=f"{seen / (time.perf_counter() - start):.0f}")
    bar.close()
    model.eval()
    trained = TrainedReranker(reranker, steps, seen, time.perf_counter() - start)
    logger.info("reranker trained: %d steps, %d pairs in %.1f s (%.1f pairs/s)", steps, seen, trained.seconds,
                trained.pairs_per_second)
    return trained


def _batches(pairs: list[Pair], batch_size: int, rng: random.Random) -> Iterator[list[Pair]]:
    """Endless batches: the pairs reshuffled every epoch."""
    while True:
        order = list(pairs)
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield order[i: i + batch_size]


def validate(reranker: CrossEncoderReranker, folders: Sequence[Path],
             config: RerankerTrainConfig) -> list[dict[str, Any]]:
    """Per folder, on its validation split (`router eval`'s measure): recall@k and MRR of MiniLM cosine and of
    the reranker re-ordering MiniLM's top `rerank_top_k`, within each question's document and bank-wide."""
    from vllm_doc2atom.encoders import SentenceTransformerEncoder

    from .evaluate import RouterEvalConfig, evaluate_dataset

    encoder, results = SentenceTransformerEncoder(), []
    for folder in folders:
        eval_config = RouterEvalConfig(data=[str(folder)], split="validation",
                                       methods=(f"minilm_{config.text}",), rerank_top_k=config.rerank_top_k,
                                       rerank_text=config.text)
        try:
            result = evaluate_dataset(str(folder), eval_config, encoder, reranker)
        except InputError as err:  # the folder has no labelled validation questions
            logger.warning("no validation for %s: %s", folder, err)
            continue
        results.append(asdict(result))
        methods = result.methods
        logger.info("%s validation (%d questions): within-document recall@1 reranker %.3f, MiniLM %.3f",
                    result.name, result.questions, methods["reranker"].document["recall@1"],
                    methods[f"minilm_{config.text}"].document["recall@1"])
    return results


def summary(validation: list[dict[str, Any]], text: str) -> dict[str, dict[str, float]]:
    """Per dataset: within-document recall@1 of MiniLM cosine and of the reranker (the card's headline)."""
    return {result["name"]: {"questions": result["questions"],
                             "minilm_recall@1": result["methods"][f"minilm_{text}"]["document"]["recall@1"],
                             "reranker_recall@1": result["methods"]["reranker"]["document"]["recall@1"]}
            for result in validation}


def save_trained(out: Path, trained: TrainedReranker, config: RerankerTrainConfig,
                 card: dict[str, Any]) -> None:
    """reranker.safetensors and reranker.json into OUT, swapped in at once (a reader never sees half a
    folder)."""
    with atomic_directory(out) as tmp:
        trained.reranker.save(tmp, {
            "name": config.name or out.name, "train_split": "train", "steps": trained.steps,
            "pairs_seen": trained.pairs, "wall_seconds": round(trained.seconds, 1),
            "pairs_per_second": round(trained.pairs_per_second, 1), "seed": config.seed,
            "config": asdict(config), "versions": _versions(), **card})
        for path in tmp.rglob("*"):
            if path.is_file():
                make_readable(path)
    logger.info("reranker: %s", out)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers")}
