"""Study questions for each atom: what a user might ask that the atom answers.

Three sources, cheapest first:
- **span questions** (rules, always): each answer-like span of the atom (a number, a date, a name) is replaced by
  the wh-phrase that asks for it ("built in 1743 by the shipwright Odela Vance" -> "built in which year ...?",
  "... by which shipwright?"). Small base models write poor questions; these are always well-formed and name
  the atom's own answer.
- **model questions** (the base model reading the document, sampled, then filtered): other phrasings.
- **recital** (deterministic): "What does the document say about <subject>, starting with <first words>?",
  answered with the atom's own text: the fact verbatim, as Parametric RAG's passage rewrite does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

QUESTION_WORDS = ("what", "who", "whom", "whose", "which", "when", "where", "why", "how", "in which", "on which",
                  "at which", "to which", "from which", "by whom", "is", "are", "was", "were", "does", "did", "do",
                  "can", "name")
# A model "question" that talks about the task instead of the document.
_META = re.compile(r"\b(answer|question|sentence|text|passage|paragraph|rewrite|reword|grammar)\b", re.I)

_UNIT = (r"(?:\s?(?:%|percent|per cent|meters?|metres?|kilometers?|km|kilograms?|kg|grams?|g|tonnes?|tons?|liters?|"
         r"litres?|years?|months?|weeks?|days?|hours?|minutes?|seconds?|degrees?|°C|°F|euros?|dollars?|pounds?|"
         r"people|members|employees|students|species|copies|units|pages|paces|miles?|feet|inches?|cm|mm|ml|"
         r"[a-z]+s))?")
_MONTHS = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("date", re.compile(rf"\b(?:\d{{1,2}} {_MONTHS}(?: \d{{4}})?|{_MONTHS} \d{{1,2}}(?:, \d{{4}})?|"
                        rf"{_MONTHS} \d{{4}})\b")),
    ("year", re.compile(r"\b(?:1[5-9]\d\d|20\d\d)\b")),
    ("money", re.compile(r"[$€£]\s?\d[\d,.]*(?:\s?(?:million|billion))?")),
    ("number", re.compile(rf"\b\d[\d,.]*(?:\s?(?:million|billion|thousand))?{_UNIT}")),
    ("name", re.compile(r"(?<![.!?]\s)(?<!^)\b(?:Dr\. |Mr\. |Ms\. |Mrs\. |St\. )?[A-Z][\w'-]+"
                        r"(?:\s(?:of |the |de |van )?[A-Z][\w'-]+)*")),
]
_PERSON_CUES = re.compile(r"\b(by|director|founder|author|captain|chef|mayor|master|manager|chair|head|engineer|"
                          r"botanist|shipwright|scientist|coach|leader|president|minister|professor|Dr\.|"
                          r"written|led|who|said|says|told)\b[^,.;]{0,25}$", re.I)
_PLACE_CUES = re.compile(r"\b(in|at|on|from|to|near|of the island of|city of|town of)\s*(the\s)?$", re.I)


@dataclass(frozen=True)
class StudyQuestion:
    atom: int  # index of the atom (in its document) that answers it
    text: str
    source: str  # "span", "model" or "recital"
    answer: str | None = None  # fixed answer (recital); None: the teacher answers


def answer_spans(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of the answer-like spans of a sentence, left to right, not overlapping."""
    taken: list[tuple[str, int, int]] = []
    words = list(re.finditer(r"\S+", text))
    subject_end = words[1].end() if len(words) > 1 else 0
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span()
            value = m.group(0).strip()
            if kind == "name" and (start < subject_end or len(value) < 3):
                continue  # the sentence's subject names the topic: a question keeps it
            if all(end <= s or start >= e for _, s, e in taken):
                taken.append((kind, start, start + len(value)))
    return sorted(taken, key=lambda t: t[1])


def _wh_phrase(kind: str, before: str, span: str) -> str:
    if kind == "date":
        return "on which date"
    if kind == "year":
        return "which year" if re.search(r"\b(in|since|until|by|from)\s*$", before) else "when"
    if kind == "money":
        return "how much"
    if kind == "number":
        unit = re.sub(r"^[\d,.\s]+(?:million|billion|thousand)?\s?", "", span)
        return f"how many {unit}".strip() if unit else "how many"
    if _PERSON_CUES.search(before):
        return "whom" if re.search(r"\bby\s*$", before) else "who"
    if _PLACE_CUES.search(before):
        return "where" if re.search(r"\b(in|at|near)\s*(the\s)?$", before) else "which place"
    return "what"


def span_questions(atom_text: str, limit: int = 3) -> list[str]:
    """The atom with one answer span swapped for its wh-phrase, as a question (at most `limit`)."""
    return [question for question, _ in span_questions_with_answers(atom_text, limit)]


# Where a sentence's next clause starts: a question about one span need not carry the rest of the sentence.
_NEXT_CLAUSE = re.compile(r",|;|\s(?:and|but|which|who|where|while|that)\s")


def span_questions_with_answers(atom_text: str, limit: int = 3,
                                clipped: bool = False) -> list[tuple[str, str]]:
    """(question, answer) pairs: the answer is the atom's own text, which states the asked span. `clipped` adds,
    after each question, the same question ending with the asked span's clause ("... is how many meters tall?"):
    users ask about one fact, not the whole sentence."""
    sentence = atom_text.strip().rstrip(".!?;:")
    questions = []
    for kind, start, end in answer_spans(sentence)[:limit]:
        before, span, after = sentence[:start], sentence[start:end], sentence[end:]
        wh = _wh_phrase(kind, before, span)
        before = re.sub(r"\b(in|on|at)\s*$", lambda m: "" if wh in ("when", "where", "on which date") else m.group(0),
                        before, flags=re.I)
        variants = [after]
        cut = _NEXT_CLAUSE.search(after)
        if clipped and cut:
            variants.append(after[: cut.start()])
        for ending in variants:
            question = f"{before}{wh}{ending}".strip()
            questions.append((question[0].upper() + question[1:] + "?", atom_text.strip()))
    return questions


def clean_model_question(raw: str, atom_text: str) -> str | None:
    """The first question in a model's reply, or None when it is not a usable question about the atom."""
    text = raw.strip().strip('"').removeprefix("Question:").removeprefix("Q:").strip().strip('"')
    if "?" not in text:
        return None
    text = text[: text.index("?") + 1].strip().strip('"')
    words = re.findall(r"[\w'-]+", text.lower())
    if not 3 <= len(words) <= 30 or not text.lower().startswith(QUESTION_WORDS) or _META.search(text):
        return None
    atom_words = set(re.findall(r"[\w'-]+", atom_text.lower()))
    content = [w for w in words if len(w) > 3]
    if not content or not any(w in atom_words for w in content):
        return None  # shares no content word with the atom: about something else
    return text


def model_question_prompt(document: str, subject: str, atom_text: str) -> list[dict[str, str]]:
    """Chat messages asking the base model for one question about the atom (document first: a shared prefix)."""
    return [{"role": "user", "content": f"{document}\n\nWrite one question about {subject} whose answer is in this "
                                        f"sentence: \"{atom_text}\"\nWrite only the question."}]


def recital(subject: str, atom_text: str, atom: int) -> StudyQuestion:
    first_words = " ".join(atom_text.split()[:3])
    return StudyQuestion(atom, f"What does the document say about {subject}, starting with \"{first_words}\"?",
                         "recital", atom_text.strip())


def document_subject(text: str) -> str:
    """What a document is about, for prompts: its heading, else the first words of its first sentence."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            heading = re.match(r"^#+\s*(.+)$", line)
            if heading:
                return heading.group(1).strip()
            first = re.split(r"(?<=[.!?])\s", line)[0]
            return " ".join(first.split()[:6]).rstrip(".,;:")
    return "the document"


def dedupe(questions: Sequence[StudyQuestion]) -> list[StudyQuestion]:
    seen, kept = set(), []
    for q in questions:
        key = re.sub(r"\W+", " ", q.text.lower()).strip()
        if key not in seen:
            seen.add(key)
            kept.append(q)
    return kept
