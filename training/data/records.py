"""The records every data source produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# What a question is, for training and evaluation.
ANSWERABLE = "answerable"  # the document answers it
UNANSWERABLE = "unanswerable"  # about the document, but the document does not answer it (SQuAD v2): refuse
OFF_TOPIC = "off_topic"  # about something else entirely (a question of another document): refuse
QUESTION_KINDS = (ANSWERABLE, UNANSWERABLE, OFF_TOPIC)


@dataclass
class Document:
    id: str  # unique across the corpus, stable across runs (splits hash it)
    text: str
    title: str = ""
    source: str = ""  # which loader made it, e.g. "squad2"
    split: str = ""  # a split fixed by the source (your own held-out file); "" = hashed from the id


@dataclass
class Question:
    id: str
    document_id: str
    question: str
    answers: list[str] = field(default_factory=list)  # gold answers; empty for probes
    answer_starts: list[int] = field(default_factory=list)  # char offset of each answer in the document, -1 unknown
    kind: str = ANSWERABLE
    supporting_spans: list[tuple[int, int]] = field(default_factory=list)  # evidence sentences (HotpotQA)
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in QUESTION_KINDS:
            raise ValueError(f"question {self.id!r}: unknown kind {self.kind!r}")
        if self.answer_starts and len(self.answer_starts) != len(self.answers):
            raise ValueError(f"question {self.id!r}: {len(self.answers)} answers but "
                             f"{len(self.answer_starts)} answer starts")
        self.supporting_spans = [tuple(s) for s in self.supporting_spans]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["supporting_spans"] = [list(s) for s in self.supporting_spans]
        return data


@dataclass
class Corpus:
    documents: dict[str, Document]
    questions: list[Question]

    def __post_init__(self) -> None:
        missing = {q.document_id for q in self.questions} - set(self.documents)
        if missing:
            raise ValueError(f"questions refer to unknown documents: {sorted(missing)[:5]}")
