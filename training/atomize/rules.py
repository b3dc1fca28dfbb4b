"""The rule-based atomizer: deterministic, offline and fast; the default.

    document -> paragraphs -> sentences -> clauses (at ';' and ', and/but/while' between long halves)
             -> one atom per clause: its verbatim span, a self-contained text (a leading pronoun replaced by,
                or a subject-less clause prefixed with, the entity the paragraph is about), a type from
                surface patterns, and metadata (answer-bearing, abstraction level, confidence, relations).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vllm_doc2atom.bank_interface import AtomRecord

# A sentence ends at . ! ? followed by whitespace (so "3.2 meters" stays whole) or at a line break;
# a period after a title abbreviation ("Dr. Okafor") does not end it.
SENTENCE = re.compile(
    r"\S.*?(?:(?<!\bDr)(?<!\bMr)(?<!\bMs)(?<!\bMrs)(?<!\bSt)(?<!\bProf)(?<!\bNo)[.!?](?=\s|$)|(?=\n)|$)", re.DOTALL)
CLAUSE_BREAK = re.compile(r";\s+(?:and\s+|but\s+)?|,\s+(?:and|but|while|whereas)\s+")
HEADING = re.compile(r"^#+\s*(.+)$")
PRONOUN = re.compile(r"^(it|its|he|his|she|her|they|their|this|these)\b", re.I)
# A clause that starts with a verb has lost its subject to the previous clause.
VERB_START = re.compile(r"^(?:is|was|are|were|has|had|have|can|will|would|returns|holds|keeps|lies|stands|"
                        r"became|remains|runs|uses|produces|exports|includes)\b")
ENTITY = re.compile(r"^((?:The\s+)?(?:[A-Z][\w'-]*)(?:\s+(?:of|the|de|and|[A-Z][\w'-]*))*\s*[A-Z]?[\w'-]*)")
YEAR = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")
NUMBER = re.compile(r"\d")
PROPER_INSIDE = re.compile(r"(?<=\s)[A-Z][a-z]")

TYPE_PATTERNS = [
    ("process_step", re.compile(r"^(?:First|Second|Third|Fourth|Fifth|Then|Next|Finally|Lastly|Afterwards|"
                                r"Step\s+\d+)\b")),
    ("evidence_fragment", re.compile(r"\b(?:according to|reported|study|studies|survey|evidence|showed|shows|"
                                     r"found that|measured|records? show)\b", re.I)),
    ("event_relation", re.compile(r"\b(?:founded|built|opened|discovered|wrote|written|born|died|established|won|"
                                  r"signed|launched|began|ended|invented|created|married|moved|elected|"
                                  r"destroyed|held|published)\b", re.I)),
    ("entity_attribute", re.compile(r"\b(?:is|are|was|were|has|have)\b.*\b(?:\d|called|named|known as|tall|wide|"
                                    r"long|high|director|capital|located|population|made of|color|colour)\b",
                                    re.I)),
]


@dataclass
class RuleAtomizerConfig:
    min_chars: int = 12  # shorter clauses (list markers, fragments) are not atoms
    split_clauses: bool = True
    min_clause_words: int = 4  # both halves of a split must have this many words


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Sentence spans of text[start:end]."""
    end = len(text) if end is None else end
    return [(start + m.start(), start + m.end()) for m in SENTENCE.finditer(text[start:end])]


class RuleAtomizer:
    def __init__(self, config: RuleAtomizerConfig | None = None) -> None:
        self.config = config or RuleAtomizerConfig()

    def __call__(self, document_id: str, text: str) -> list[AtomRecord]:
        return self.atomize(document_id, text)

    def atomize(self, document_id: str, text: str) -> list[AtomRecord]:
        atoms: list[AtomRecord] = []
        entity = ""
        for p_start, p_end in _paragraphs(text):
            heading = HEADING.match(text[p_start:p_end])
            if heading:
                entity = heading.group(1).strip()  # a heading names what the following text is about
                continue
            previous: AtomRecord | None = None
            for s_start, s_end in split_sentences(text, p_start, p_end):
                sentence = text[s_start:s_end]
                subject = leading_subject(sentence, text)
                if subject:
                    entity = subject
                for c_start, c_end in self._clauses(text, s_start, s_end):
                    clause = text[c_start:c_end]
                    if len(clause) < self.config.min_chars:
                        continue
                    standalone = _self_contained(clause, entity)
                    atom = AtomRecord(
                        id=f"{document_id}#{len(atoms)}", document_id=document_id, type=_atom_type(clause),
                        text=standalone, span=(c_start, c_end), answer_bearing=_answer_bearing(clause),
                        abstraction_level=0 if _answer_bearing(clause) else 1,
                        confidence=1.0 if standalone == clause else 0.9,
                        relations=[{"type": "follows", "target": previous.id}] if previous else [],
                        retrieval_text=f"{entity}: {standalone}" if entity and entity not in standalone else standalone,
                    )
                    atoms.append(atom)
                    previous = atom
        return atoms

    def _clauses(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Clause spans of one sentence; a split happens only between two long enough halves."""
        if not self.config.split_clauses:
            return [(start, end)]
        spans, cursor = [], start
        for match in CLAUSE_BREAK.finditer(text, start, end):
            left, right = text[cursor : match.start()], text[match.end() : end]
            if len(left.split()) >= self.config.min_clause_words and len(right.split()) >= self.config.min_clause_words:
                spans.append((cursor, match.start()))
                cursor = match.end()
        spans.append((cursor, end))
        return spans


def _paragraphs(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+(?:\n(?!\s*\n)[^\n]+)*", text)]


def leading_subject(sentence: str, text: str) -> str:
    """The proper-noun phrase a sentence opens with ("The Harbor of Quillon", "Irena Soltz"), if any.

    A one-word phrase counts only if the document also capitalises it mid-sentence: "Quillon" yes,
    "Every" or "Visitors" no.
    """
    if PRONOUN.match(sentence) or TYPE_PATTERNS[0][1].match(sentence):
        return ""
    match = ENTITY.match(sentence)
    if not match:
        return ""
    words = match.group(1).split()
    while words and words[-1][0].islower():
        words.pop()  # trailing "of"/"the" or a lower-case word caught by the last optional group
    phrase = " ".join(words)
    if len(words) == 1 or (len(words) == 2 and words[0] == "The"):
        if not re.search(rf"(?<=[a-z,;] ){re.escape(words[-1])}\b", text):
            return ""
    return phrase if len(phrase) > 3 else ""


def _self_contained(clause: str, entity: str) -> str:
    """Resolve a leading pronoun or a missing subject with the current entity."""
    if not entity:
        return clause
    pronoun = PRONOUN.match(clause)
    if pronoun:
        word = pronoun.group(1)
        replacement = f"{entity}'s" if word.lower() in ("its", "his", "her", "their") else entity
        return replacement + clause[len(word):]
    if VERB_START.match(clause):
        return f"{entity} {clause}"
    return clause


def _atom_type(clause: str) -> str:
    for name, pattern in TYPE_PATTERNS:
        if name == "event_relation":
            if YEAR.search(clause) and pattern.search(clause):
                return name
        elif pattern.search(clause):
            return name
    return "fact_claim"


def _answer_bearing(clause: str) -> bool:
    """Specific details (numbers, dates, names past the first word) are what questions ask for."""
    return bool(NUMBER.search(clause) or PROPER_INSIDE.search(clause))
