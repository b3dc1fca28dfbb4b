"""Refusal of self-study banks on many documents: the compiler's own calibration (each document's study
questions against the built-in off-topic probes, `StudyCompiler.calibrated_spec`) scored on the real questions
of a built dataset (router refusals only: a reply in which the model itself declines is not counted).

Refusal depends only on the router (sentence encoder, reranker) and the study questions, never on the fitted
factors, so no atom is fitted here and a hundred documents take minutes: the served eval's few documents per
set hold too few off-topic probes to settle the target (refusal F1 >= 0.95, answerable refused <= 5 %; on
SQuAD v2, refusal F1 over all negatives, unanswerable included, >= 0.70). One bank per document, as
`doc2atom eval` compiles them, routed as served (`--reranker shipped`, the default, or `none`):

    .venv/bin/python benchmarks/study_refusal.py --data data/squad2-eval --split test [--reranker none]

Prints the rates and saves benchmarks/results/study_refusal.json (one entry per dataset and split).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study_composition import data_arguments, model_folder  # noqa: E402

from training.compile import StudyCompiler, StudyConfig  # noqa: E402
from training.evaluate.harness import load_items  # noqa: E402
from training.thresholds import refusal_scores  # noqa: E402
from vllm_doc2atom.bank_interface import DocumentAtoms  # noqa: E402
from vllm_doc2atom.router_head import DEFAULT_THRESHOLD  # noqa: E402


def measure(data: str, split: str, limit: int | None, model_dir: Path, reranker: str = "shipped") -> dict:
    """Per document: calibrate its bank's threshold as the compiler does, then refuse (or not) each real
    question by its best atom's router weight."""
    import torch

    name, documents, items = load_items(data, split, limit, 0)
    compiler = StudyCompiler(model_dir, StudyConfig(cache=False), reranker=reranker)
    top = {"answerable": [], "off_topic": [], "unanswerable": []}  # (weight, threshold) per question
    for doc_id, text in documents.items():
        atoms = compiler.atomizer(doc_id, text)
        questions = [i for i in items if i.document_id == doc_id]
        if not atoms or not questions:
            continue
        keys = torch.from_numpy(compiler.encoder.encode([a.retrieval_text or a.text for a in atoms])).float()
        compiler.positives[doc_id] = compiler.positive_weights(text, atoms, keys)
        head = compiler.calibrated_spec([DocumentAtoms(doc_id, atoms, {"keys": keys})]).router_head
        threshold = DEFAULT_THRESHOLD if head["threshold"] is None else head["threshold"]  # as the server does
        routed = compiler.router.candidates([i.question for i in questions], atoms, keys.numpy())
        for item, candidates in zip(questions, routed):
            top.setdefault(item.kind, []).append((candidates[0].weight, threshold))
    refused = {kind: [w < t for w, t in pairs] for kind, pairs in top.items()}
    # the eval's off-topic refusal F1: refusing is positive, over off-topic probes and answerable questions
    off_topic = refusal_scores([(True, r) for r in refused["off_topic"]]
                               + [(False, r) for r in refused["answerable"]])
    # and over every question that should be refused: on-topic ones no atom answers too (SQuAD v2)
    negatives = refusal_scores([(True, r) for r in refused["off_topic"] + refused["unanswerable"]]
                               + [(False, r) for r in refused["answerable"]])
    return {"dataset": name, "split": split, "documents": len(documents), "reranker": reranker,
            "questions": {kind: len(r) for kind, r in refused.items()},
            "refused_percent": {kind: round(100 * sum(r) / max(len(r), 1), 1) for kind, r in refused.items()},
            "off_topic_refusal_f1": round(100 * off_topic.f1, 1),
            "all_negatives_refusal_f1": round(100 * negatives.f1, 1)}


def main() -> None:
    parser = data_arguments(__doc__, limit=None)
    parser.add_argument("--out", default="benchmarks/results/study_refusal.json")
    parser.add_argument("--reranker", default="shipped", help="shipped (default), none, or a reranker folder")
    args = parser.parse_args()
    result = measure(args.data, args.split, args.limit, model_folder(args.model), args.reranker)
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    saved[f"{result['dataset']}/{args.split}/{Path(args.reranker).name}"] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
