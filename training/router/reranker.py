"""The stage-2 reranker: a MiniLM cross-encoder scoring (question, atom text) pairs; build, save, load."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_doc2atom.encoders import MINILM_IDENTITY, PACKAGED_MINILM, packaged_minilm_path

from ..inputs import InputError, require_folder

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)

CARD = "reranker.json"  # what was trained, on what, how well; written beside the weights
CARD_KIND = "doc2atom cross-encoder reranker"
CARD_VERSION = 1
WEIGHTS = "model.safetensors"
RERANKER_HINT = "give a folder written by `doc2atom router train`"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_MAX_LENGTH = 128  # question + atom tokens; longer pairs are truncated (atoms are short)


def base_model_card() -> dict[str, str]:
    """Which weights a new reranker starts from (for its card)."""
    from importlib.metadata import version

    package = PACKAGED_MINILM.replace("_", "-")
    return {"name": MINILM_IDENTITY, "package": package, "package_version": version(package),
            "head": "fresh 1-logit classifier (BertForSequenceClassification)"}


def new_cross_encoder(max_length: int = DEFAULT_MAX_LENGTH, device: str = "cpu") -> CrossEncoder:
    """The packaged all-MiniLM-L6-v2 encoder under a fresh 1-logit head (BertForSequenceClassification)."""
    return _cross_encoder(packaged_minilm_path(), max_length, device)


def _cross_encoder(folder: Path, max_length: int | None, device: str) -> CrossEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    import torch
    from sentence_transformers import CrossEncoder

    # use_safetensors: never fall back to a pickled checkpoint; Identity: predict() gives logits
    return CrossEncoder(str(folder), num_labels=1, max_length=max_length, device=device,
                        local_files_only=True, activation_fn=torch.nn.Identity(),
                        model_kwargs={"use_safetensors": True})


class Reranker:
    """(question, texts) -> one relevance logit per text; callable as the plugin's `Reranker` hook."""

    def __init__(self, model: CrossEncoder, card: dict[str, Any] | None = None, batch_size: int = 32) -> None:
        self.model = model
        self.card = card or {}
        self.batch_size = batch_size

    @property
    def max_length(self) -> int:
        return self.model.max_seq_length

    def score(self, question: str, texts: Sequence[str]) -> np.ndarray:
        """[len(texts)] float32 logits (higher: more relevant)."""
        import torch

        if not texts:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict([(question, text) for text in texts], batch_size=self.batch_size,
                                    activation_fn=torch.nn.Identity(), convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32).reshape(len(texts))

    def __call__(self, question: str, texts: Sequence[str]) -> np.ndarray:
        return self.score(question, texts)

    def save(self, folder: Path, card: dict[str, Any]) -> None:
        """Into an existing `folder`: weights (safetensors), configs and tokenizer (JSON), the card."""
        self.model.save_pretrained(str(folder), safe_serialization=True)
        card = {"kind": CARD_KIND, "format_version": CARD_VERSION, "max_length": self.max_length, **card}
        (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
        pickles = pickle_files(folder)
        if pickles:
            raise RuntimeError(f"saving the reranker wrote pickle files {pickles}; refusing to keep them")
        self.card = card


def pickle_files(folder: Path) -> list[str]:
    """Files under `folder` that may hold pickled Python objects (never written, never loaded)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    """reranker.json of a saved reranker; InputError when the folder or its card is missing or malformed."""
    path = require_folder(folder, "reranker", RERANKER_HINT, files=(CARD, WEIGHTS, "config.json"))
    try:
        card = json.loads((path / CARD).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"reranker {path}: {CARD} is not valid JSON ({err}): {RERANKER_HINT}") from err
    if not isinstance(card, dict) or card.get("kind") != CARD_KIND:
        raise InputError(f"reranker {path}: {CARD} does not describe a doc2atom reranker: {RERANKER_HINT}")
    if card.get("format_version") != CARD_VERSION:
        raise InputError(f"reranker {path} has format version {card.get('format_version')}, this doc2atom "
                         f"reads version {CARD_VERSION}: retrain it with `doc2atom router train`")
    return card


def load_reranker(folder: str | os.PathLike, max_length: int | None = None, device: str = "cpu",
                  batch_size: int = 32) -> Reranker:
    """A saved reranker (`max_length` overrides the trained one); InputError for a missing or corrupt one."""
    from safetensors import SafetensorError

    card = read_card(folder)
    path = Path(folder)
    pickles = pickle_files(path)
    if pickles:
        raise InputError(f"reranker {path} holds pickle files {pickles}: doc2atom loads safetensors only; "
                         "remove them or retrain with `doc2atom router train`")
    try:
        model = _cross_encoder(path, max_length or card.get("max_length"), device)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())
        raise InputError(f"reranker {path} cannot be loaded ({reason}): {RERANKER_HINT}") from err
    return Reranker(model, card, batch_size=batch_size)
