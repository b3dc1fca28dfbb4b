"""Labelled (question, atom text) pairs for the reranker: gold atoms positive, hard and random negatives."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest

from .examples import RoutingExample
from .routing_text import routing_text

PAIR_TEXTS = ("text", "titled")  # the text kinds of `router eval` (evaluate.TEXT_KINDS) an example can give


@dataclass(frozen=True)
class Pair:
    question: str
    text: str
    label: float  # 1.0: the atom holds the answer; 0.0: it does not


def atom_texts(example: RoutingExample, text: str = "titled") -> tuple[str, ...]:
    """What the reranker reads for each atom of the example's document: the atom's own text (`text`), or
    "<what the document is about>: <atom text>" (`titled`, routing_text.py)."""
    if text not in PAIR_TEXTS:
        raise ValueError(f"unknown text kind {text!r} for reranker pairs: {', '.join(PAIR_TEXTS)}")
    if text == "text":
        return example.atom_texts
    return tuple(routing_text(example.title, atom) for atom in example.atom_texts)


def document_pairs(examples: Sequence[RoutingExample], same_document: int, other_document: int,
                   rng: random.Random, text: str = "titled") -> list[list[Pair]]:
    """Per example: one positive per gold atom, each followed by `same_document` negatives from its own
    document (hard: same topic; supporting atoms are never negatives) and `other_document` random atoms of
    other documents of `examples` (also filling in where the document has too few other atoms)."""
    documents = {e.document_id: atom_texts(e, text) for e in examples}
    document_ids = list(documents)
    grouped = []
    for example in examples:
        texts = documents[example.document_id]
        answering = example.gold | example.supporting
        candidates = [i for i in range(len(texts)) if i not in answering]
        pairs = []
        for gold in sorted(example.gold):
            pairs.append(Pair(example.question, texts[gold], 1.0))
            hard = rng.sample(candidates, min(same_document, len(candidates)))
            pairs += [Pair(example.question, texts[i], 0.0) for i in hard]
            for _ in range(other_document + same_document - len(hard) if len(document_ids) > 1 else 0):
                other = example.document_id
                while other == example.document_id:
                    other = rng.choice(document_ids)
                pairs.append(Pair(example.question, rng.choice(documents[other]), 0.0))
        grouped.append(pairs)
    return grouped


def mixed_pairs(datasets: Sequence[Sequence[RoutingExample]], same_document: int, other_document: int,
                seed: int, max_pairs: int | None = None, text: str = "titled") -> list[Pair]:
    """The pairs of several datasets, their examples shuffled and taken in turn (each dataset contributes
    alike under `max_pairs`); negatives are drawn within each dataset. Seeded: same call, same pairs."""
    rng = random.Random(seed)
    streams = []
    for examples in datasets:
        examples = list(examples)
        rng.shuffle(examples)
        streams.append(document_pairs(examples, same_document, other_document, rng, text))
    pairs: list[Pair] = []
    for turn in zip_longest(*streams):
        for group in turn:
            if group is None:
                continue
            if max_pairs is not None and len(pairs) + len(group) > max_pairs:
                return pairs
            pairs += group
    return pairs
