"""Calibrate a checkpoint's refusal threshold on held-out documents.

The router head is trained to score atoms, not to sit its refusal boundary at weight 0.5: on unseen
documents a good share of answerable questions can fall just below it. `calibrate` compiles the held-out
documents of a dataset exactly as `doc2atom compile` does (one bank per document), routes their questions
and off-topic probes as the server does, and picks the threshold that maximizes refusal F1 (ties: the
widest gap between scores). The value goes into checkpoint.json; banks compiled from then on carry it in
their router head, and the server uses it unless `--doc2atom-threshold` is given.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from vllm_doc2atom.files import atomic_write_text

from .evaluate.scoring import RefusalScores, refusal_scores

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    threshold: float
    refusal_precision: float
    refusal_recall: float
    refusal_f1: float
    answerable: int  # questions that should be answered
    refusable: int  # off-topic probes and unanswerable questions
    data: str  # dataset folder name
    split: str


def refusals_at(threshold: float, answerable: list[float], refusable: list[float]) -> RefusalScores:
    """Refusal precision/recall/F1 when a question is refused for its best atom's weight below `threshold`."""
    return refusal_scores([(False, w < threshold) for w in answerable] + [(True, w < threshold) for w in refusable])


def best_threshold(answerable: list[float], refusable: list[float]) -> tuple[float, float]:
    """(threshold, refusal F1): the midpoint between two consecutive top weights that refuses best."""
    scores = sorted(set(answerable) | set(refusable) | {0.0, 1.0})
    best = (-1.0, -1.0, 0.5)  # (F1, gap, threshold)
    for low, high in zip(scores, scores[1:]):
        threshold = (low + high) / 2
        best = max(best, (refusals_at(threshold, answerable, refusable).f1, high - low, threshold))
    return best[2], best[0]


def top_weights(checkpoint: str | Path, data: str | Path, split: str) -> tuple[list[float], list[float]]:
    """The best atom's router weight for each question of the split: (answerable, to be refused)."""
    from vllm_doc2atom.router import RouterConfig, RouterPool

    from .compile import AmortizedCompiler
    from .evaluate.harness import load_items

    _, documents, items = load_items(data, split, None, 0)
    compile_one = AmortizedCompiler(checkpoint)
    routers = RouterPool(RouterConfig(threshold_override=0.0))
    answerable, refusable = [], []
    with tempfile.TemporaryDirectory(prefix="doc2atom-calibrate-") as scratch:
        for i, (doc_id, text) in enumerate(tqdm(documents.items(), desc="calibrate", unit="doc")):
            compiled = compile_one(doc_id, text)
            if compiled is None:
                continue
            bank = compile_one.create_bank(Path(scratch) / str(i), [compiled])
            for item in (q for q in items if q.document_id == doc_id):
                result = routers.route(bank, item.question)
                weight = max((c.weight for c in result.candidates), default=0.0)
                (answerable if item.kind == "answerable" else refusable).append(weight)
    return answerable, refusable


def calibrate(checkpoint: str | Path, data: str | Path, split: str = "validation") -> Calibration:
    """Choose the refusal threshold on `split` of the dataset at `data` and store it in the checkpoint."""
    checkpoint = Path(checkpoint)
    answerable, refusable = top_weights(checkpoint, data, split)
    if not answerable or not refusable:
        raise ValueError(f"{data}: the {split} split needs answerable questions and off-topic probes "
                         f"(has {len(answerable)} and {len(refusable)})")
    threshold, _ = best_threshold(answerable, refusable)
    scores = refusals_at(threshold, answerable, refusable)
    result = Calibration(round(threshold, 4), scores.precision, scores.recall, scores.f1, len(answerable),
                         len(refusable), Path(data).name, split)
    meta_path = checkpoint / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["router_calibration"] = asdict(result)
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    logger.info("refusal threshold %.4f written to %s", result.threshold, meta_path)
    return result
