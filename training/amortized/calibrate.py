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

from ..inputs import checkpoint_folder, dataset_folder
from ..thresholds import best_threshold, refusals_at

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


def top_weights(checkpoint: str | Path, data: str | Path, split: str) -> tuple[list[float], list[float]]:
    """The best atom's router weight for each question of the split: (answerable, to be refused)."""
    from vllm_doc2atom.router import RouterConfig, RouterPool

    from ..compile import AmortizedCompiler
    from ..evaluate.harness import load_items

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
    checkpoint = checkpoint_folder(checkpoint)
    dataset_folder(data)
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
