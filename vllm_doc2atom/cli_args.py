"""`vllm serve MODEL --plugin doc2atom`: the flag, the `--doc2atom-*` options, and what they expand into.

vLLM has no `--plugin` flag. It loads general plugins right before it builds its engine-args parser
(`AsyncEngineArgs.add_cli_args`), so `register()` wraps `EngineArgs.add_cli_args` to add our options
and to post-process the parsed namespace: with `--plugin doc2atom` it appends our ASGI middleware and
turns on LoRA with defaults sized for composed adapters, never overriding a flag the user gave.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .settings import DEFAULT_REFUSAL, EVIDENCE_MODES, default_adapter_dir

logger = logging.getLogger(__name__)

PLUGIN_NAME = "doc2atom"
MIDDLEWARE = "vllm_doc2atom.middleware.Doc2AtomMiddleware"
# vLLM options we set when the user did not: composed adapters have rank Σ r_i (8 atoms · rank 4 = 32).
LORA_DEFAULTS: dict[str, Any] = {"enable_lora": True, "max_lora_rank": 64, "max_loras": 8, "max_cpu_loras": 64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if any("--plugin" in a.option_strings for a in parser._actions):
        return  # idempotent: vLLM may build the same parser twice
    parser.add_argument("--plugin", action="append", default=[], metavar="NAME",
                        help="Enable a serving plugin; `--plugin doc2atom` answers requests that name an "
                             "`atom_bank` from compiled parametric memory.")
    group = parser.add_argument_group("doc2atom", "Options of `--plugin doc2atom`.")
    group.add_argument("--doc2atom-bank-root", default=os.environ.get("DOC2ATOM_BANK_ROOT", "banks"),
                       help="Folder holding the atom banks that requests may name (default: $DOC2ATOM_BANK_ROOT "
                            "or ./banks). A request's `atom_bank` is a path relative to it.")
    group.add_argument("--doc2atom-top-k", type=int, default=8, help="Stage-1 candidates per question.")
    group.add_argument("--doc2atom-threshold", type=float, default=None,
                       help="Router weight below which an atom is dropped; no atom left means refusal "
                            "(default: each bank's threshold, calibrated with its checkpoint; else 0.5).")
    group.add_argument("--doc2atom-stage2", action="store_true",
                       help="Banks without a reranker of their own: add metadata bias (stage 2). Banks compiled "
                            "with a reranker are always routed with it.")
    group.add_argument("--doc2atom-on-refusal", choices=["refuse", "base"], default="refuse",
                       help="When no atom covers a question: answer the refusal message without a model call "
                            "(refuse), or let the base model answer (base).")
    group.add_argument("--doc2atom-evidence", nargs="?", const="with-adapter", default="off",
                       choices=EVIDENCE_MODES,
                       help="Put the routed atoms' own text before the question (a few dozen tokens): "
                            "'with-adapter' (the flag alone) besides the composed adapter, 'only' instead of it "
                            "(no adapter), 'off' (default: the adapter alone). A request's `atom_evidence` "
                            "(false / true / \"only\") overrides it.")
    group.add_argument("--doc2atom-refusal-message", default=DEFAULT_REFUSAL, help="The refusal answer.")
    group.add_argument("--doc2atom-adapter-dir", default=default_adapter_dir(),
                       help="Where composed adapters are written for the engine to load (tmpfs if available).")
    group.add_argument("--doc2atom-adapter-cache", type=int, default=64,
                       help="Composed adapters kept registered while no request uses them (LRU).")


def _given(argv: Sequence[str], dest: str) -> bool:
    """Did the command line set this option (as --a-b, --a_b, --a-b=x or --no-a-b)?"""
    names = {"--" + dest.replace("_", "-"), "--" + dest, "--no-" + dest.replace("_", "-")}
    return any(a in names or a.split("=", 1)[0] in names for a in argv)


def expand(namespace: argparse.Namespace, argv: Sequence[str]) -> None:
    """Apply `--plugin doc2atom` to a parsed `vllm serve` namespace."""
    plugins = getattr(namespace, "plugin", None) or []
    unknown = [p for p in plugins if p != PLUGIN_NAME]
    if unknown:
        raise SystemExit(f"vllm serve: unknown --plugin {unknown[0]!r} (available: {PLUGIN_NAME})")
    if PLUGIN_NAME not in plugins or not hasattr(namespace, "middleware"):
        return
    middleware = list(namespace.middleware or [])
    if MIDDLEWARE not in middleware:
        middleware.append(MIDDLEWARE)
    namespace.middleware = middleware
    for dest, value in LORA_DEFAULTS.items():
        if not _given(argv, dest):
            setattr(namespace, dest, value)
    if not namespace.enable_lora:
        raise SystemExit("vllm serve: --plugin doc2atom needs LoRA; remove --no-enable-lora")
    logger.info("doc2atom: serving atom banks from %s", os.path.abspath(namespace.doc2atom_bank_root))


def install_parser_hook() -> None:
    """Wrap EngineArgs.add_cli_args (once) so every engine-args parser learns `--plugin doc2atom`."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args
    if getattr(original, "_doc2atom_wrapped", False):
        return

    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        add_arguments(parser)
        parse_known_args = parser.parse_known_args

        def parse_known_args_and_expand(args=None, namespace=None):
            namespace, rest = parse_known_args(args, namespace)
            expand(namespace, list(args) if args is not None else sys.argv[1:])
            return namespace, rest

        parser.parse_known_args = parse_known_args_and_expand
        return parser

    add_cli_args._doc2atom_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
