"""Fictional documents with templated questions: knowledge no base model has, so internalization is
measured honestly. Invented names, places and numbers; every answer is a verbatim span of its document."""

from __future__ import annotations

import random

from .records import ANSWERABLE, Corpus, Document, Question

_SYLLABLES = ["bra", "vel", "mor", "quil", "dan", "esk", "tor", "lin", "sa", "ven", "ka", "rho", "mi", "zu", "pel",
              "gor", "thi", "na", "os", "ur", "fen", "dra", "lo", "ce", "vak"]

# Each family: sentences with {slots}; each sentence carries (question, answer slot) pairs.
_FAMILIES: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {
    "town": [
        ("{name} is a fishing town on the {direction} coast of the island of {place}.",
         [("On which island is {name}?", "place")]),
        ("The harbor of {name} was built in {year} by the shipwright {person}.",
         [("Who built the harbor of {name}?", "person"), ("When was the harbor of {name} built?", "year")]),
        ("Its lighthouse, called the {landmark}, is {number} meters tall.",
         [("What is the lighthouse of {name} called?", "landmark"), ("How tall is the {landmark}?", "number")]),
        ("Every spring the town holds the Festival of {thing}.", [("Which festival does {name} hold?", "thing")]),
        ("The harbor master is {person2}, who keeps a ledger of every ship.",
         [("Who is the harbor master of {name}?", "person2")]),
        ("{name} exports dried {good} to the city of {place2}.",
         [("What does {name} export?", "good"), ("To which city does {name} export?", "place2")]),
    ],
    "observatory": [
        ("{name} Observatory stands on Mount {place} at an altitude of {number} meters.",
         [("On which mountain is {name} Observatory?", "place"), ("At what altitude is {name} Observatory?",
                                                                   "number")]),
        ("Its main telescope, the {landmark} Reflector, has a mirror {small} meters wide.",
         [("What is the main telescope of {name} Observatory called?", "landmark"),
          ("How wide is the mirror of the {landmark} Reflector?", "small")]),
        ("The observatory was opened in {year} by the Guild of {place2}.",
         [("When was {name} Observatory opened?", "year"), ("Which guild opened {name} Observatory?", "place2")]),
        ("In {year2} astronomers there discovered the comet {person}, which returns every {period} years.",
         [("Which comet was discovered at {name} Observatory?", "person"),
          ("How often does the comet {person} return?", "period")]),
        ("The director of the observatory is Dr. {person2}.", [("Who directs {name} Observatory?", "person2")]),
    ],
    "protocol": [
        ("The {name} Protocol is a method for growing {good} in high valleys.",
         [("What does the {name} Protocol grow?", "good")]),
        ("First, the soil is mixed with crushed {thing} to keep it warm at night.",
         [("What is mixed into the soil in the {name} Protocol?", "thing")]),
        ("Second, the saplings are planted exactly {small} paces apart.",
         [("How far apart are saplings planted in the {name} Protocol?", "small")]),
        ("The protocol was written by the botanist {person} in {year}.",
         [("Who wrote the {name} Protocol?", "person"), ("When was the {name} Protocol written?", "year")]),
        ("Orchards that follow it harvest about {period} percent more fruit.",
         [("How much more fruit do orchards following the {name} Protocol harvest?", "period")]),
        ("The protocol is taught at the school of {place}.", [("Where is the {name} Protocol taught?", "place")]),
    ],
}


def _word(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "name": _word(rng, 3), "place": _word(rng), "place2": _word(rng), "landmark": f"{_word(rng)} {_word(rng)}",
        "person": f"{_word(rng)} {_word(rng)}", "person2": f"{_word(rng)} {_word(rng, 3)}",
        "thing": _word(rng).lower() + "stone", "good": _word(rng).lower() + "berries",
        "direction": rng.choice(["northern", "southern", "eastern", "western"]),
        "year": str(rng.randint(1600, 1990)), "year2": str(rng.randint(1991, 2020)),
        "number": str(rng.randint(20, 3000)), "small": str(rng.randint(2, 12)), "period": str(rng.randint(13, 90)),
    }


def synthetic_corpus(num_documents: int = 100, seed: int = 0) -> Corpus:
    """`num_documents` fictional documents (families in rotation), 6-12 questions each."""
    rng = random.Random(seed)
    documents: dict[str, Document] = {}
    questions: list[Question] = []
    families = sorted(_FAMILIES)
    for n in range(num_documents):
        family = families[n % len(families)]
        slots = _slots(rng)
        doc_id = f"synthetic/{family}/{n:05d}"
        text, pending = "", []
        for sentence, qas in _FAMILIES[family]:
            start = len(text) + (1 if text else 0)
            filled = sentence.format(**slots)
            text = f"{text} {filled}" if text else filled
            for question, slot in qas:
                answer = slots[slot]
                pending.append((question.format(**slots), answer, start + filled.index(answer)))
        documents[doc_id] = Document(id=doc_id, text=text, title=slots["name"], source="synthetic")
        for i, (question, answer, offset) in enumerate(pending):
            assert text[offset : offset + len(answer)] == answer
            questions.append(Question(id=f"{doc_id}/q{i}", document_id=doc_id, question=question, answers=[answer],
                                      answer_starts=[offset], kind=ANSWERABLE, source="synthetic"))
    return Corpus(documents, questions)
