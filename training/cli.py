"""The `doc2atom` command line: one parser-builder and handler per subcommand in `training/commands/`."""

from __future__ import annotations

import argparse
import logging
import sys

from vllm_doc2atom.errors import Doc2AtomError

from .commands import add_all

logger = logging.getLogger(__name__)

# A bad input, or a failure the message explains (a missing package, an unreadable file): one line, exit 2.
# Anything else is a bug and keeps its traceback.
REPORTED = (Doc2AtomError, ValueError, RuntimeError, OSError)
CHATTY_LOGGERS = ("faiss.loader", "sentence_transformers", "httpx", "httpx2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doc2atom", description="Compile documents into atom banks of "
                                     "micro-LoRAs that vLLM routes and composes per question.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_all(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except REPORTED as exc:
        logger.debug("%s failed", command_name(args), exc_info=True)  # the traceback, with --verbose
        print(f"{command_name(args)}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def command_name(args: argparse.Namespace) -> str:
    """`doc2atom compile`, `doc2atom bank info`, ... as argparse names them in its own errors."""
    return " ".join(["doc2atom", args.command, *([args.action] if getattr(args, "action", None) else [])])


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (some libraries' messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
