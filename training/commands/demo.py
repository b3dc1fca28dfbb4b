"""`doc2atom demo`: compile example documents, serve them with vLLM, ask questions."""

from __future__ import annotations

import argparse

from ..inputs import checkpoint_folder
from .compile import check_mode


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="compile example documents, serve them with vLLM, ask questions (the README's main job)")
    p.add_argument("--cache-dir", help="model cache folder")
    p.add_argument("--checkpoint", help="amortized/optimize: compiler checkpoint (default: the shipped one)")
    p.add_argument("--keep", action="store_true", help="keep the bank and the server log")
    p.add_argument("--mode", choices=["study", "amortized", "optimize"], default="study",
                   help="compile mode (see `doc2atom compile --help`): study fits every atom by self-study "
                        "(default); amortized uses the shipped compiler; optimize refines its atoms")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..amortized.shipped import shipped_checkpoint
    from ..demo import run_demo
    from ..models import prepare_model

    check_mode(args)
    checkpoint = None  # checked before the model is prepared
    if args.mode != "study":
        checkpoint = checkpoint_folder(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    model_dir = prepare_model(cache_dir=args.cache_dir)
    print(f"base model: {model_dir}")
    return 0 if run_demo(model_dir, checkpoint, keep=args.keep, mode=args.mode) else 1
