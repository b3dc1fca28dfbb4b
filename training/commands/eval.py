"""`doc2atom eval`: every method side by side on held-out documents."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..device import add_device_flags, device_from_args
from ..inputs import InputError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..evaluate.methods import METHODS

    p = subparsers.add_parser(
        "eval", help="score every method side by side on held-out documents",
        description="Compile the held-out documents of each dataset for every method, answer their "
                    "questions (served by vllm serve --plugin doc2atom, or transformers+PEFT in process), "
                    "and write a Markdown table, results.json, results.png and every reply. Datasets come "
                    "from `doc2atom data build --source ...` (any loader or your own SQuAD .json / .jsonl "
                    "file; no teacher needed).")
    p.add_argument("--data", action="append", required=True, help="a built dataset folder (repeatable)")
    p.add_argument("--out", required=True, help="output folder (banks, adapters, results)")
    p.add_argument("--checkpoint", help="doc2atom checkpoint (methods doc2atom, doc2atom_optimize)")
    p.add_argument("--d2l-atom-checkpoint",
                   help="checkpoint trained with method d2l_atom (baseline d2l_atom)")
    p.add_argument("--d2l-raw-checkpoint",
                   help="d2l_atom checkpoint trained on --atomizer chunks data (d2l_raw)")
    p.add_argument("--model", help="base model (default: the checkpoints')")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (a method without its "
                        "checkpoint is skipped)")
    p.add_argument("--backend", choices=["served", "transformers"], default="served")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="documents per dataset (a seeded, deterministic sample)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--max-lora-rank", type=int, default=64,
                   help="vLLM's --max-lora-rank (8, 16, 32, 64, 128, 256, ...): the composed and the "
                        "monolithic adapters must fit (a d2l_study adapter has rank --rank x its document's "
                        "atoms)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (served)")
    p.add_argument("--top-k", type=int, default=8, help="router: atoms per question at most")
    p.add_argument("--threshold", type=float, help="router: minimum weight, else refuse (default: the "
                                                    "checkpoint's calibrated threshold, else 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine-steps", type=int, default=8, help="doc2atom_optimize: refinement steps per atom")
    p.add_argument("--refine-lr", type=float, default=1e-3,
                   help="doc2atom_optimize: refinement learning rate")
    p.add_argument("--no-gold-nll", dest="gold_nll", action="store_false",
                   help="skip the gold answer's NLL per answerable question (teacher-forced through each "
                        "method in process with transformers+PEFT, after the answers)")
    p.add_argument("--serve-args", default="", help='extra `vllm serve` arguments, e.g. "--dtype float32"')
    add_device_flags(p, "the base model of the compiles and of --backend transformers (vllm serve places "
                        "its own)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.harness import EvalConfig, run_eval
    from ..evaluate.report import write_report

    try:
        serve_args = shlex.split(args.serve_args)
    except ValueError as err:
        raise InputError(f"--serve-args {args.serve_args}: {err} (quote it as one shell argument)") from err
    device_from_args(args)  # --device / --dtype refused now, not after the datasets are read
    config = EvalConfig(data=args.data, out=args.out, checkpoint=args.checkpoint,
                        d2l_atom_checkpoint=args.d2l_atom_checkpoint,
                        d2l_raw_checkpoint=args.d2l_raw_checkpoint, model=args.model,
                        methods=args.methods.split(","), backend=args.backend, split=args.split,
                        limit=args.limit, max_tokens=args.max_tokens, max_lora_rank=args.max_lora_rank,
                        concurrency=args.concurrency, top_k=args.top_k, threshold=args.threshold,
                        seed=args.seed, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                        serve_args=serve_args, device=args.device, dtype=args.dtype,
                        gold_nll=args.gold_nll)
    results = run_eval(config)
    print(write_report(results, Path(args.out)))
    print(f"\n{args.out}/results.json, results.md, results.png, replies.jsonl")
    return 0
