"""Off-topic probes drawn across documents: other documents' questions that a document cannot answer,
labelled for refusal."""

from __future__ import annotations

import random

from .records import ANSWERABLE, OFF_TOPIC, Corpus, Question


def off_topic_probes(corpus: Corpus, per_document: int = 1, seed: int = 0) -> list[Question]:
    """For each document, questions drawn from OTHER documents whose answers it does not contain."""
    rng = random.Random(seed)
    answerable = [q for q in corpus.questions if q.kind == ANSWERABLE]
    probes: list[Question] = []
    if len({q.document_id for q in answerable}) < 2:
        return probes
    for doc_id, document in sorted(corpus.documents.items()):
        text = document.text.lower()
        picked: list[Question] = []
        # Random draws instead of filtering every question for every document: linear in the corpus size.
        for _ in range(20 * per_document):
            source = answerable[rng.randrange(len(answerable))]
            if source.document_id == doc_id or source in picked \
                    or any(a.lower() in text for a in source.answers if len(a) > 2):
                continue
            picked.append(source)
            if len(picked) == per_document:
                break
        probes += [Question(id=f"{q.id}@{doc_id}", document_id=doc_id, question=q.question, kind=OFF_TOPIC,
                            source=q.source) for q in picked]
    return probes
