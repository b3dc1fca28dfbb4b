"""`doc2atom checkpoint export | calibrate`: trained memory compiler checkpoints."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    checkpoint = subparsers.add_parser("checkpoint", help="trained checkpoints").add_subparsers(
        dest="action", required=True)
    p = checkpoint.add_parser("export", help="copy a checkpoint without its optimizer state (for shipping)")
    p.add_argument("checkpoint", help="a checkpoint folder written by `doc2atom train`")
    p.add_argument("out", help="folder to write (files already there that the export does not write, e.g. a "
                               "card, are kept)")
    p.set_defaults(func=run_export)
    p = checkpoint.add_parser(
        "calibrate", help="choose the router's refusal threshold on held-out documents",
        description="Compile the split's documents, route their questions and off-topic probes, and store "
                    "the threshold of best refusal F1 in the checkpoint: banks compiled from then on carry "
                    "it, and the server uses it unless --doc2atom-threshold is given.")
    p.add_argument("checkpoint", help="a checkpoint folder (training or exported)")
    p.add_argument("--data", required=True, help="a dataset folder from `doc2atom data build` (with probes)")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                   help="documents to calibrate on (default: validation; never the split you report)")
    p.set_defaults(func=run_calibrate)


def run_export(args: argparse.Namespace) -> int:
    from ..amortized.checkpoint import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from ..amortized.calibrate import calibrate

    result = calibrate(args.checkpoint, args.data, args.split)
    print(f"refusal threshold {result.threshold}: refusal precision {result.refusal_precision:.3f}, recall "
          f"{result.refusal_recall:.3f}, F1 {result.refusal_f1:.3f} over {result.answerable} answerable and "
          f"{result.refusable} off-topic questions of the {result.split} split of {result.data}; stored in "
          f"{args.checkpoint}/checkpoint.json")
    return 0
