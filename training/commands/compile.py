"""`doc2atom compile`: documents -> atoms -> micro-LoRAs -> an atom bank."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..device import add_device_flags, device_from_args
from ..inputs import InputError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..compile import StudyConfig
    from ..study.fit import FitConfig

    study, fit = StudyConfig(), FitConfig()
    p = subparsers.add_parser(
        "compile", help="compile documents into an atom bank",
        description="Cut documents into atoms and make each atom's micro-LoRA. --mode study (default) fits "
                    "them by self-study with the base model itself (any causal LM folder, no trained "
                    "compiler); amortized/optimize use a trained memory compiler checkpoint. The base model "
                    "runs on the GPU in bfloat16 when torch sees one, else on the CPU in float32 (--device, "
                    "--dtype); banks come out the same format either way.")
    p.add_argument("documents", nargs="+", help=".txt/.md files (id = file name) or .jsonl of {id, text}")
    p.add_argument("--out", required=True, help="bank folder to write")
    p.add_argument("--model", help="base model: a packaged name or a Hugging Face model folder (study "
                                   "default: smollm2-135m-instruct; amortized: the checkpoint's)")
    p.add_argument("--checkpoint", help="amortized/optimize: a checkpoint folder written by `doc2atom train` "
                                        "(default: the shipped checkpoint of the default base model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bank")
    p.add_argument("--add", action="store_true",
                   help="add the documents to the existing bank at --out (same mode, model and adapter "
                        "settings; a document with the same id is replaced, the others are untouched)")
    p.add_argument("--mode", choices=["study", "amortized", "optimize"], default="study",
                   help="study: fit every atom by self-study (questions + the base model reading the "
                        "document as teacher; the atoms of a document fitted together, composed as served); "
                        "amortized: one compiler pass per atom; optimize: amortized, then a few "
                        "context-distillation steps per atom")
    p.add_argument("--modules", default=",".join(study.modules),
                   help="study: adapted linears (comma-separated)")
    p.add_argument("--layers", type=int, default=study.last_layers, help="study: adapt the last N layers")
    p.add_argument("--rank", type=int, default=study.rank, help="study: micro-LoRA rank per atom")
    p.add_argument("--steps", type=int, default=fit.steps, help="study: optimizer steps per document")
    p.add_argument("--passes", type=float, default=None,
                   help="study: steps from passes over each document's examples instead of --steps, so the "
                        "cost follows the atom count (16: 2.5x faster than 60 steps on short documents, "
                        "some quality lost)")
    p.add_argument("--lr", type=float, default=fit.lr, help="study: learning rate")
    p.add_argument("--model-questions", type=int, default=study.model_questions,
                   help="study: questions sampled from the base model per atom (besides the rule-made ones)")
    p.add_argument("--no-cache", action="store_true", help="study: recompute even documents already studied")
    add_device_flags(p, "the base model (generation, teacher and fitting; optimize mode's refinement)")
    p.add_argument("--refine-steps", type=int, default=8, help="optimize mode: steps per atom")
    p.add_argument("--refine-lr", type=float, default=1e-3, help="optimize mode: learning rate")
    p.add_argument("--atomizer", choices=["rules", "chunks"], default="rules",
                   help="rules: typed atoms (default); chunks: fixed windows, for a d2l_raw baseline "
                        "checkpoint")
    p.add_argument("--reranker", default="shipped",
                   help="study: the stage-2 reranker the bank is routed and calibrated with: shipped (default: "
                        "a MiniLM cross-encoder trained on routing data), none (stage 1 only, as banks before "
                        "it), or a folder written by `doc2atom router train` (copied into the bank)")
    p.add_argument("--routing-text", choices=["atom", "titled"], default=None,
                   help="what keys and reranker read of an atom: atom (the atomizer's text) or titled ('<what "
                        "the document is about>: <atom text>': its heading or title line, else its file name, "
                        "else its first sentence's subject); default: titled with the shipped reranker (it was "
                        "trained on it), else atom. The atoms' text and spans are the same either way")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compile import RefineConfig, StudyConfig, compile_documents, read_documents
    from ..study.fit import FitConfig

    check_flags(args)
    device = device_from_args(args)  # an InputError before any document is read or model loaded
    documents = read_documents(args.documents)
    study = StudyConfig(modules=tuple(args.modules.split(",")), last_layers=args.layers, rank=args.rank,
                        model_questions=args.model_questions, cache=not args.no_cache,
                        fit=FitConfig(steps=args.steps, passes=args.passes, lr=args.lr))
    bank, stats = compile_documents(documents, args.out, mode=args.mode, checkpoint=args.checkpoint,
                                    model_dir=args.model, overwrite=args.overwrite, atomizer=args.atomizer,
                                    add=args.add, study=study, routing_text=args.routing_text,
                                    reranker=args.reranker, device=device,
                                    refine=RefineConfig(steps=args.refine_steps, lr=args.refine_lr))
    if bank is None:  # a torchrun rank other than 0: its share is in the cache, rank 0 writes the bank
        return 0
    print(json.dumps({"bank": str(bank.path), **stats}, indent=2))
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """Flags that do not go together, refused before any document is read."""
    check_mode(args)
    if Path(args.out).exists() and not (args.overwrite or args.add):
        raise InputError(f"--out {args.out} exists: pass --overwrite to replace it, or --add to add these "
                         "documents to it")


def check_mode(args: argparse.Namespace) -> None:
    """--checkpoint goes with --mode amortized or optimize only, --reranker with study."""
    if args.checkpoint and args.mode == "study":
        raise InputError("--checkpoint is for --mode amortized or optimize; study mode needs no checkpoint")
    if getattr(args, "reranker", "shipped") != "shipped" and args.mode != "study":
        raise InputError("--reranker is for --mode study; amortized banks are routed by their checkpoint's head")
