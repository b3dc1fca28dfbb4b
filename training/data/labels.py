"""Question-to-atom labels: which atoms hold the answer (gold), which complete a multi-hop chain
(supporting), and which are the rest (distractors). Deterministic, from answer offsets and evidence spans."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vllm_doc2atom.bank_interface import AtomRecord

from .records import ANSWERABLE, Question


@dataclass
class QuestionLabels:
    gold: list[str] = field(default_factory=list)
    supporting: list[str] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return asdict(self)


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def label_question(question: Question, atoms: list[AtomRecord], document: str) -> QuestionLabels:
    """Gold: atoms whose span covers an answer occurrence (its recorded offset, else any occurrence of the
    answer text); supporting: other atoms overlapping an evidence span; distractors: all the rest.
    Probes (unanswerable, off-topic) have every atom as a distractor."""
    if question.kind != ANSWERABLE:
        return QuestionLabels(distractors=[a.id for a in atoms])
    answer_spans: list[tuple[int, int]] = []
    lowered = document.lower()
    for i, answer in enumerate(question.answers):
        start = question.answer_starts[i] if i < len(question.answer_starts) else -1
        if start >= 0 and document[start : start + len(answer)] == answer:
            answer_spans.append((start, start + len(answer)))
            continue
        if answer.lower() in ("yes", "no"):
            continue  # a yes/no answer is not a text span: evidence spans label those
        found = lowered.find(answer.lower())
        while found >= 0 and answer:
            answer_spans.append((found, found + len(answer)))
            found = lowered.find(answer.lower(), found + 1)
    gold = [a.id for a in atoms if any(_overlaps(a.span, s) for s in answer_spans)]
    supporting = [a.id for a in atoms if a.id not in gold
                  and any(_overlaps(a.span, s) for s in question.supporting_spans)]
    if not gold and supporting and not answer_spans:
        gold, supporting = supporting, []  # yes/no multi-hop: the evidence is what answers
    taken = set(gold) | set(supporting)
    return QuestionLabels(gold=gold, supporting=supporting, distractors=[a.id for a in atoms if a.id not in taken])
