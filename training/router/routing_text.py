"""Self-contained routing text: "<what the document is about>: <atom text>", what keys and rerankers read.

An atom cut from a document often leaves its subject behind ("Sync is faster, too"); prefixing what the whole
document is about makes it routable among other documents' atoms. Only routing inputs change: the atom's own
text and span (its evidence) stay exactly as they are.
"""

from __future__ import annotations

import re
from dataclasses import replace

from vllm_doc2atom.bank_interface import AtomRecord

from ..atomize.rules import HEADING, leading_subject, split_sentences

ROUTING_TEXTS = ("atom", "titled")  # atom: the atomizer's retrieval text (the default); titled: prefixed
TITLE_LINE_WORDS = 12  # a first line of at most this many words (and no sentence ending) is a title line
TITLE_LINE_CHARS = 100


def document_about(text: str, title: str = "", name: str = "") -> str:
    """What a document is about, first found of: the source's `title` (underscores as spaces: SQuAD's
    "Super_Bowl_50"); a leading markdown heading or short title line; the file `name` in words
    ("release_notes-4.2" -> "release notes 4.2"); the proper-noun subject its first sentence opens with
    (the rule atomizer's heuristic: "The Harbor of Quillon is ..." -> "The Harbor of Quillon"); else ""."""
    for found in (_clean(title), _title_line(text), _clean(re.sub(r"[-_]+", " ", name))):
        if re.search(r"[^\W\d_]", found):  # holds a letter: "2031" or "01" is no title
            return found
    sentences = split_sentences(text)
    return leading_subject(text[slice(*sentences[0])], text) if sentences else ""


def routing_text(about: str, atom_text: str) -> str:
    """The text routing sees for one atom: "<about>: <atom text>", or the atom text alone without `about`."""
    return f"{about}: {atom_text}" if about else atom_text


def titled_atoms(atoms: list[AtomRecord], about: str) -> list[AtomRecord]:
    """The atoms with `retrieval_text` (what compile keys) set to their routing text; text and span kept."""
    return [replace(atom, retrieval_text=routing_text(about, atom.text)) for atom in atoms]


def _clean(title: str) -> str:
    return " ".join(title.replace("_", " ").split())


def _title_line(text: str) -> str:
    """The first non-blank line when it is a heading, or a short line without a sentence ending that more text
    follows ("Halvenite", "Lumora Notes 4.2 — Release Notes (published 14 March 2031)")."""
    lines = text.strip().splitlines()
    if not lines:
        return ""
    first = lines[0].strip()
    heading = HEADING.match(first)
    if heading:
        return heading.group(1).strip()
    short = len(first.split()) <= TITLE_LINE_WORDS and len(first) <= TITLE_LINE_CHARS
    if len(lines) > 1 and short and not first.endswith((".", "!", "?", ",", ";", ":")):
        return first
    return ""


class TitledAtomizer:
    """An atomizer whose atoms route by their titled text (`compile --routing-text titled`); what a document is
    about comes from its text, else its id (a .txt/.md file's name)."""

    def __init__(self, atomizer) -> None:
        self.atomizer = atomizer

    def __call__(self, document_id: str, text: str) -> list[AtomRecord]:
        return titled_atoms(self.atomizer(document_id, text), document_about(text, name=document_id))
