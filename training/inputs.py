"""Checks of the files and folders a user names: documents, base models, checkpoints, datasets, outputs.

Each check raises `InputError`, whose message names the path and says what to do; library callers can catch
it (it is a `ValueError` too) and the `doc2atom` CLI prints it as one line with exit status 2. The checks are
cheap, so callers run them before loading any model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from vllm_doc2atom.errors import Doc2AtomError

StrPath = str | os.PathLike

MODEL_HINT = ("give a packaged model name (see `doc2atom models list`) or a Hugging Face model folder "
              "(`doc2atom models prepare` writes the default one)")
CHECKPOINT_HINT = "give a folder written by `doc2atom train` or `doc2atom checkpoint export`"
DATASET_HINT = "give a folder written by `doc2atom data build`"


class InputError(Doc2AtomError, ValueError):
    """A file, folder or setting given to doc2atom is missing or malformed; the message says what to do."""


def require_file(path: StrPath, what: str) -> Path:
    """`path`, an existing file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    return path


def require_folder(path: StrPath, what: str, hint: str, files: tuple[str, ...] = ()) -> Path:
    """`path`, an existing folder holding `files`; else an error ending with `hint`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist: {hint}")
    if not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder: {hint}")
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise InputError(f"{what} {path} has no {' or '.join(missing)}: {hint}")
    return path


def model_folder(path: StrPath) -> Path:
    """A Hugging Face model folder (with config.json)."""
    return require_folder(path, "base model folder", MODEL_HINT, files=("config.json",))


def checkpoint_folder(path: StrPath) -> Path:
    """A memory compiler checkpoint folder (checkpoint.json and the weights)."""
    return require_folder(path, "checkpoint", CHECKPOINT_HINT, files=("checkpoint.json", "compiler.safetensors"))


def dataset_folder(path: StrPath) -> Path:
    """A dataset folder built by `doc2atom data build` (with manifest.json)."""
    return require_folder(path, "dataset", DATASET_HINT, files=("manifest.json",))


def output_folder(path: StrPath, what: str = "output folder") -> Path:
    """A folder to write: new, or an existing folder; never an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file: give the path of a folder to write")
    return path


def read_text(path: StrPath, what: str = "document") -> str:
    """The contents of a UTF-8 text file."""
    path = require_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        byte = f"byte {err.start} is {err.object[err.start]:#04x}"
        raise InputError(f"{what} {path} is not UTF-8 text ({byte}): save it as UTF-8, e.g. with "
                         "`iconv -f latin1 -t utf-8`") from err


def name_list(names: Iterable[str], limit: int = 8) -> str:
    """Names for a message: the first `limit`, comma-separated, then how many more."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "none") + more
