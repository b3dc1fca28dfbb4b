"""Doc-to-Atom for vLLM: documents compiled into atom banks of micro-LoRAs, routed and composed per query.

This module is the `vllm.general_plugins` entry point, so vLLM imports it in every process
(API server, engine core, workers). Keep it free of heavy imports: torch, faiss and
sentence-transformers are imported lazily by the modules that need them.
"""

import logging

__version__ = "0.1.0"

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """vLLM general-plugin hook: cheap and idempotent.

    The serving hooks (`--plugin doc2atom`, request routing) are installed by the plugin layer;
    until it is enabled this only records that the package was found.
    """
    global _registered
    if _registered:
        return
    _registered = True
    logger.debug("doc2atom %s found by vLLM's plugin loader", __version__)
