"""Doc-to-Atom for vLLM: documents compiled into atom banks of micro-LoRAs, routed and composed per query.

This module is the `vllm.general_plugins` entry point, so vLLM imports it in every process
(API server, engine core, workers). Keep it free of heavy imports: torch, faiss and
sentence-transformers are imported lazily by the modules that need them.
"""

import logging
import sys

__version__ = "0.1.0"

logger = logging.getLogger(__name__)


def register() -> None:
    """vLLM general-plugin hook: teach `vllm serve` the `--plugin doc2atom` flag. Cheap and idempotent.

    Only the process that parses the command line needs the hook, and it has imported vLLM's
    argument module by then; other processes (engine core, workers) skip it at no cost.
    """
    if "vllm.engine.arg_utils" not in sys.modules:
        return
    from .cli_args import install_parser_hook

    install_parser_hook()
