"""`doc2atom data build`: training and evaluation data from one QA source."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..device import add_device_flags, device_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="training data").add_subparsers(dest="action", required=True)
    p = data.add_parser(
        "build", help="atoms, probes, labels, splits and teacher targets from one source",
        description="Load a QA source, cut its documents into atoms, add off-topic probes, label every "
                    "question with its gold/supporting/distractor atoms, split by document, and (with --model) "
                    "cache the teacher's answers and top-k log-probabilities.")
    p.add_argument("--source", required=True, help="squad2, hotpotqa, squad1, drop, qasper_yesno, synthetic, "
                                                   "or a SQuAD .json / .jsonl file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, help="at most this many documents (quick runs)")
    p.add_argument("--model", help="teacher base model: a folder or a packaged name; omit to skip teacher "
                                   "targets")
    p.add_argument("--teacher-backend", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto (default): vLLM for big jobs when it is installed, else transformers")
    add_device_flags(p, "the transformers teacher (vLLM places itself; it takes an explicit --dtype)")
    p.add_argument("--top-k", type=int, default=16, help="teacher log-probabilities kept per answer token")
    p.add_argument("--atomizer", choices=["rules", "llm", "chunks"], default="rules",
                   help="rules (default), llm (an OpenAI-compatible endpoint), chunks (raw windows: d2l_raw)")
    p.add_argument("--llm-base-url", default="http://127.0.0.1:8000/v1",
                   help="OpenAI-compatible endpoint (llm)")
    p.add_argument("--llm-model", default="", help="model name at that endpoint (llm)")
    p.add_argument("--llm-api-key", default="none")
    p.add_argument("--probes-per-doc", type=int, default=1, help="off-topic probes per document")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from ..data.build import BuildConfig, build_dataset, check_source
    from ..models import resolve_model

    check_source(args.source)  # before preparing a teacher model
    device_from_args(args)  # --device / --dtype checked as early
    model = str(resolve_model(args.model)) if args.model else None
    config = BuildConfig(source=args.source, out=Path(args.out), limit=args.limit, atomizer=args.atomizer,
                         llm_base_url=args.llm_base_url, llm_model=args.llm_model,
                         llm_api_key=args.llm_api_key, probes_per_document=args.probes_per_doc,
                         teacher_model=model, teacher_backend=args.teacher_backend, top_k=args.top_k,
                         seed=args.seed, teacher_device=args.device, teacher_dtype=args.dtype)
    manifest = build_dataset(config)
    summary = {key: manifest[key] for key in ("counts", "seconds", "atoms_per_second", "teacher")}
    print(json.dumps(summary, indent=2))
    return 0
