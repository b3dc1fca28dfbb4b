"""Disk cache of the trainer's frozen inputs (safetensors + JSON), so a resumed run skips preparation.

Preparation runs the base model over every document and question: 10-60 minutes on a CPU, repeated by
every `--resume`. Its result depends only on the dataset's files, the base model, the sentence encoder
and two settings, so it is stored under a key made of those; any change there computes it afresh.
The prepared records (`AtomTable`, `QuestionItem`) are defined here; `prepare.py` computes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vllm_doc2atom.files import atomic_directory, make_readable

from .atom_inputs import AtomInputs
from .config import TrainConfig
from .student_inputs import StudentExample

logger = logging.getLogger(__name__)

FORMAT = 1
DATA_FILES = ("documents.jsonl", "atoms.jsonl", "questions.jsonl", "teacher/index.jsonl")
TABLE_TENSORS = ("text_embeddings", "confidence", "groups", "types", "answer_bearing")
FEATURE_TENSORS = ("states", "embeddings", "mask")
STUDENT_TENSORS = ("hidden", "answer_positions", "answer_tokens", "topk_ids", "topk_logprobs", "fact_mask")


@dataclass
class AtomTable:
    """Every atom of the used documents, as rows."""

    ids: list[str]
    document_rows: dict[str, list[int]]  # document id -> atom rows
    features: AtomInputs  # [N, ...] what the compiler reads of each atom
    text_embeddings: torch.Tensor  # [N, D] sentence-encoder embeddings of retrieval texts
    confidence: torch.Tensor  # [N]
    groups: torch.Tensor  # [N] conflict-group index, -1 none
    types: torch.Tensor  # [N] index into ATOM_TYPES
    answer_bearing: torch.Tensor  # [N] 0/1

    def metadata(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(types, answer_bearing, confidence) of some rows: the router head's metadata inputs."""
        return self.types[rows], self.answer_bearing[rows], self.confidence[rows]


@dataclass
class QuestionItem:
    id: str
    document_id: str
    kind: str
    split: str
    positives: list[int]  # atom rows: gold + supporting
    gold: list[int]
    embedding: torch.Tensor  # [D]
    student: StudentExample | None  # answerable questions with teacher targets
    prompt_hidden: torch.Tensor | None  # probes: hidden states of the prompt alone [t, H]


def cache_key(config: TrainConfig, model_dir: str | Path, encoder_identity: str) -> str:
    """Hash of everything the prepared inputs depend on (file contents, not paths: a moved dataset still
    hits)."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        path = Path(config.data) / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    settings = {"format": FORMAT, "model": str(Path(model_dir).resolve()), "encoder": encoder_identity,
                "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
                "encoder_layer": config.encoder_layer, "adapted_layers": config.adapted_layers,
                "max_train_questions": config.max_train_questions}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def save_prepared(folder: Path, key: str, table: AtomTable, items: list[QuestionItem]) -> None:
    """Write `folder/<key>/` atomically and drop older keys (one cache per run folder)."""
    tensors = {f"table.{n}": getattr(table, n) for n in TABLE_TENSORS}
    tensors |= {f"features.{n}": getattr(table.features, n) for n in FEATURE_TENSORS}
    tensors["questions.embedding"] = torch.stack([q.embedding for q in items])
    for i, q in enumerate(items):
        if q.student is not None:
            tensors |= {f"student.{i}.{n}": getattr(q.student, n) for n in STUDENT_TENSORS}
        if q.prompt_hidden is not None:
            tensors[f"probe.{i}"] = q.prompt_hidden
    meta = {"format": FORMAT, "ids": table.ids, "document_rows": table.document_rows,
            "items": [{"id": q.id, "document_id": q.document_id, "kind": q.kind, "split": q.split,
                       "positives": q.positives, "gold": q.gold} for q in items]}
    with atomic_directory(folder / key) as tmp:
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        make_readable(tmp / "tensors.safetensors")
        (tmp / "prepared.json").write_text(json.dumps(meta))
        for old in folder.iterdir():  # one cached preparation at a time
            if not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    size = (folder / key / "tensors.safetensors").stat().st_size
    logger.info("prepared inputs cached in %s (%.0f MB)", folder / key, size / 2**20)


def load_prepared(folder: Path, key: str) -> tuple[AtomTable, list[QuestionItem]] | None:
    """The cached inputs for `key`, or None when there are none (or they are unreadable)."""
    path = folder / key
    try:
        meta = json.loads((path / "prepared.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:  # missing, or damaged: compute afresh
        if path.exists():
            logger.warning("ignoring the unreadable prepared-inputs cache %s: %s", path, exc)
        return None
    if meta.get("format") != FORMAT:
        return None
    table = AtomTable(ids=meta["ids"], document_rows=meta["document_rows"],
                      features=AtomInputs(*(tensors[f"features.{n}"] for n in FEATURE_TENSORS)),
                      **{n: tensors[f"table.{n}"] for n in TABLE_TENSORS})
    items = []
    for i, (q, embedding) in enumerate(zip(meta["items"], tensors["questions.embedding"])):
        student = None
        if f"student.{i}.hidden" in tensors:
            student = StudentExample(q["id"], *(tensors[f"student.{i}.{n}"] for n in STUDENT_TENSORS))
        items.append(QuestionItem(**q, embedding=embedding, student=student,
                                  prompt_hidden=tensors.get(f"probe.{i}")))
    logger.info("loaded prepared inputs from %s (%d atoms, %d questions)", path, len(table.ids), len(items))
    return table, items
