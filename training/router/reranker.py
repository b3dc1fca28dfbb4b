"""A saved reranker folder opened for the CLI: the plugin's loader (`vllm_doc2atom.reranker`) with its errors
as one-line input errors."""

from __future__ import annotations

import os

from vllm_doc2atom.reranker import CARD, WEIGHTS, CrossEncoderReranker, load_reranker

from ..inputs import InputError, require_folder

RERANKER_HINT = "give a folder written by `doc2atom router train`"


def open_reranker(folder: str | os.PathLike) -> CrossEncoderReranker:
    """The reranker in `folder`; InputError when it is missing, corrupt or does not fit the packaged MiniLM."""
    path = require_folder(folder, "reranker", RERANKER_HINT, files=(CARD, WEIGHTS))
    try:
        return load_reranker(path)
    except ValueError as err:
        raise InputError(f"{err}: {RERANKER_HINT}") from err
