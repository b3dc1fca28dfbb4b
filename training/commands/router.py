"""`doc2atom router ...`: the question router, measured offline (`eval`); its reranker, trained (`train`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..inputs import InputError, dataset_folder

logger = logging.getLogger(__name__)



def add_parser(subparsers: argparse._SubParsersAction) -> None:
    router = subparsers.add_parser("router", help="the question router: measure it, train its reranker"
                                   ).add_subparsers(dest="action", required=True)
    add_eval_parser(router)
    add_train_parser(router)


def add_eval_parser(router: argparse._SubParsersAction) -> None:
    from ..router.evaluate import METHODS, RERANK_FIRST, RERANK_SURE, TEXT_KINDS

    p = router.add_parser(
        "eval", help="rank atoms for held-out questions: recall@1/3/8 and MRR per routing method",
        description="For every answerable question of a split with gold atoms, rank the atoms of its own "
                    "document and every atom of the split's documents (the bank-wide case) by each routing "
                    "method, and report how often a gold atom comes first / in the top 3 / top 8, the MRR, "
                    "and seconds per question. Datasets come from `doc2atom data build` (no teacher needed).")
    p.add_argument("--data", action="append", required=True, help="a built dataset folder (repeatable)")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (text: the atom's text; key: "
                        "today's bank key; titled: '<what the document is about>: <text>')")
    p.add_argument("--reranker", help="a reranker folder: adds a column re-ordering MiniLM's top candidates")
    p.add_argument("--reranker-text", choices=TEXT_KINDS,
                   help="the atom text the reranker and its MiniLM first stage read (default: the one it was "
                        "trained on, else titled)")
    p.add_argument("--rerank-top-k", type=int, default=8, help="MiniLM candidates the reranker re-orders")
    p.add_argument("--rerank-first", type=int, default=RERANK_FIRST,
                   help="as banks are routed: the reranker reads this many of them first, the others only when "
                        "none scores --rerank-sure (0: all at once)")
    p.add_argument("--rerank-sure", type=float, default=RERANK_SURE, help="see --rerank-first (logits)")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=run_eval)


def add_train_parser(router: argparse._SubParsersAction) -> None:
    from ..router.pairs import PAIR_TEXTS
    from ..router.train import RerankerTrainConfig

    default = RerankerTrainConfig()
    p = router.add_parser(
        "train", help="train the stage-2 cross-encoder reranker (MiniLM) on routing pairs",
        description="Fine-tune the packaged all-MiniLM-L6-v2 under a new 1-logit head on (question, atom) "
                    "pairs of the TRAIN splits: gold atoms positive, other atoms of the same document and "
                    "random atoms of other documents negative. Then measure it on the validation splits as "
                    "`router eval` does and write OUT: reranker.safetensors + reranker.json (the card).")
    p.add_argument("--data", action="append", required=True,
                   help="a built dataset folder (repeatable: all are mixed)")
    p.add_argument("--out", required=True, help="the reranker folder to write")
    p.add_argument("--max-pairs", type=int, default=default.max_pairs,
                   help=f"training pairs, positives + negatives (default {default.max_pairs})")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch over the pairs)")
    p.add_argument("--batch-size", type=int, default=default.batch_size, help=f"default {default.batch_size}")
    p.add_argument("--lr", type=float, default=default.lr, help=f"default {default.lr}")
    p.add_argument("--max-length", type=int, default=default.max_length,
                   help=f"tokens of question + atom text (default {default.max_length})")
    p.add_argument("--layers", type=int, default=default.layers, choices=range(1, 7), metavar="1-6",
                   help=f"MiniLM layers kept: fewer score faster, more rank better (default {default.layers})")
    p.add_argument("--name", default="", help="the reranker's name in its card and in banks (default: OUT's)")
    p.add_argument("--text", choices=PAIR_TEXTS, default=default.text,
                   help=f"what the reranker reads of an atom, as `router eval --reranker-text` (default "
                        f"{default.text})")
    p.add_argument("--no-validation", action="store_true", help="skip the validation splits")
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--device", default=default.device, help="cpu (default), cuda, ...")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..router.train import RerankerTrainConfig, train_reranker

    config = RerankerTrainConfig(data=args.data, out=args.out, max_pairs=args.max_pairs, steps=args.steps,
                                 batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                                 text=args.text, layers=args.layers, name=args.name,
                                 validate=not args.no_validation, seed=args.seed,
                                 device=args.device)
    print(train_reranker(config))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..router.evaluate import RouterEvalConfig, evaluate_routing, format_table, write_results
    from ..router.reranker import open_reranker

    if args.out and Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a folder: give the path of a .json file to write")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for folder in args.data:
        dataset_folder(folder)  # a missing folder is reported before the reranker loads
    reranker = open_reranker(args.reranker) if args.reranker else None
    config = RouterEvalConfig(data=args.data, split=args.split, methods=methods, rerank_top_k=args.rerank_top_k,
                              rerank_first=args.rerank_first or None, rerank_sure=args.rerank_sure,
                              rerank_text=args.reranker_text or (reranker.text_kind if reranker else "titled"),
                              reranker_folder=args.reranker)
    results = evaluate_routing(config, reranker)
    if args.out:
        write_results(results, config, args.out)
    print(format_table(results, args.split))
    return 0
