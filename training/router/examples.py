"""Routing examples from a `doc2atom data build` folder: each answerable question of a split with its
document's atoms and the indices of its gold atoms; and every atom of the split, for bank-wide ranking."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from vllm_doc2atom.bank_interface import AtomRecord

from ..data.build import read_jsonl
from ..data.splits import SPLITS
from ..inputs import DATASET_HINT, InputError, require_folder
from .routing_text import document_about

logger = logging.getLogger(__name__)

DATA_FILES = ("documents.jsonl", "atoms.jsonl", "questions.jsonl")


@dataclass(frozen=True)
class RoutingExample:
    question: str
    document_id: str
    atom_texts: tuple[str, ...]  # every atom of the question's document, in row order
    gold: frozenset[int]  # indices into atom_texts of the atoms that hold the answer (non-empty)
    supporting: frozenset[int] = frozenset()  # multi-hop supporting atoms (HotpotQA), if labelled
    title: str = ""  # what the document is about: the source's title, else derived (see document_about)


@dataclass(frozen=True)
class SplitDocument:
    """One document of a split with its atoms, in row order."""

    id: str
    title: str  # as RoutingExample.title
    atoms: tuple[AtomRecord, ...]


@dataclass(frozen=True)
class SplitBank:
    """Every atom of every document of one split, document after document: bank-wide routing's candidates."""

    documents: tuple[SplitDocument, ...]

    @cached_property
    def atoms(self) -> tuple[AtomRecord, ...]:
        return tuple(atom for document in self.documents for atom in document.atoms)

    @cached_property
    def rows(self) -> dict[str, range]:
        """Document id -> its atoms' rows in `atoms`."""
        rows, start = {}, 0
        for document in self.documents:
            rows[document.id] = range(start, start + len(document.atoms))
            start += len(document.atoms)
        return rows


def load_split(data_dir: str | Path, split: str) -> SplitBank:
    """The documents of `split` that have atoms, with their titles and atoms."""
    folder = _checked(data_dir, split)
    atoms: dict[str, list[AtomRecord]] = {}
    for row in read_jsonl(folder / "atoms.jsonl"):
        atoms.setdefault(row["document_id"], []).append(AtomRecord.from_dict(row))
    documents = [SplitDocument(doc["id"], document_about(doc["text"], doc.get("title", "")),
                               tuple(atoms[doc["id"]]))
                 for doc in read_jsonl(folder / "documents.jsonl")
                 if doc["split"] == split and doc["id"] in atoms]
    if not documents:
        raise InputError(f"dataset {folder} has no {split} documents with atoms: choose another --split")
    return SplitBank(tuple(documents))


def load_examples(data_dir: str | Path, split: str, bank: SplitBank | None = None) -> list[RoutingExample]:
    """The answerable questions of `split` that have at least one gold atom (pass `bank` if already loaded)."""
    bank = bank or load_split(data_dir, split)
    documents = {document.id: document for document in bank.documents}
    examples, unlabelled = [], 0
    for row in read_jsonl(Path(data_dir) / "questions.jsonl"):
        document = documents.get(row["document_id"])
        if row["split"] != split or row["kind"] != "answerable" or document is None:
            continue
        index = {atom.id: i for i, atom in enumerate(document.atoms)}
        gold = frozenset(index[a] for a in row["labels"]["gold"])
        if not gold:
            unlabelled += 1
            continue
        supporting = frozenset(index[a] for a in row["labels"]["supporting"])
        examples.append(RoutingExample(row["question"], document.id, tuple(a.text for a in document.atoms),
                                       gold, supporting, document.title))
    if unlabelled:
        logger.info("%s %s: %d answerable questions without a gold atom skipped", data_dir, split, unlabelled)
    if not examples:
        raise InputError(f"dataset {data_dir} has no answerable {split} questions with gold atoms: choose "
                         "another --split, or build the dataset with `doc2atom data build`")
    return examples


def _checked(data_dir: str | Path, split: str) -> Path:
    """The dataset folder, with every file routing reads; a known split."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    return require_folder(data_dir, "dataset", DATASET_HINT, files=("manifest.json", *DATA_FILES))
