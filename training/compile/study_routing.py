"""How a self-study bank will be routed, applied at compile time: the study questions' picks (the compositions
the atoms are fitted in) and the refusal threshold (study questions against off-topic probes) come from the
server's own routing code (`vllm_doc2atom.router`), with the reranker the bank will be served with.

    question --MiniLM--> cosine top-8 of the atoms --reranker (best 4, then the rest if unsure)--> rerank
    scores --head--> kept atoms, weights

A bank compiled with a reranker records it ({"name", "sha256"}); the server routes it with exactly that one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vllm_doc2atom.bank_interface import AtomRecord, RerankerIdentity
from vllm_doc2atom.encoders import SentenceTransformerEncoder
from vllm_doc2atom.reranker import (
    CARD,
    SHIPPED_FOLDER,
    WEIGHTS,
    CrossEncoderReranker,
    load_reranker,
    shipped_identity,
)
from vllm_doc2atom.router import RoutedAtom, keep_atoms, weigh_candidates
from vllm_doc2atom.router_head import DEFAULT_THRESHOLD, RouterHead

from ..inputs import InputError, require_folder
from ..router.scorers import RERANK_FIRST, RERANK_SURE

logger = logging.getLogger(__name__)

RERANKERS = ("shipped", "none")  # or a folder written by `doc2atom router train`
TOP_K = 8  # stage-1 candidates per question, as the server's --doc2atom-top-k default
# Sentence-encoder keys alone put the right atom in the top 3 for ~9 in 10 questions (top 1: about half), so
# a bank routed by them composes up to 3 atoms of the best atom's document (atoms fitted together per document
# never saw another document's atoms summed with theirs).
STAGE1_HEAD = RouterHead(max_atoms=3, same_document=True)
# With the reranker, the reranker chooses: the atom it scores best is kept, others only within RERANK_GAP
# logits of it (chosen on validation splits: docs/results.md, "The trained reranker served"). Whether to refuse
# still weighs the stage-1 cosine too: weight = sigmoid(20·(cos − 0.35) + rerank). The reranker alone lets
# off-topic questions through (it rates some generic question about any topic highly) and refuses harder
# answerable ones; the cosine alone keeps its known refusal quality, and the sum separates both better.
RERANK_GAP = 2.0
# The reranker reads the stage-1 best RERANK_FIRST first, the others only when unsure (RERANK_SURE).
RERANKED_HEAD = RouterHead(rerank_scale=1.0, max_atoms=3, same_document=True, rerank_gap=RERANK_GAP,
                           rerank_first=RERANK_FIRST, rerank_sure=RERANK_SURE)


@dataclass
class StudyRouter:
    encoder: SentenceTransformerEncoder
    reranker: CrossEncoderReranker | None = None
    copy_from: Path | None = None  # a reranker that is not shipped: its folder, copied into the bank

    @property
    def head(self) -> RouterHead:
        return STAGE1_HEAD if self.reranker is None else RERANKED_HEAD

    @property
    def identity(self) -> RerankerIdentity | None:
        return None if self.reranker is None else self.reranker.identity

    @property
    def text_kind(self) -> str:
        return "text" if self.reranker is None else self.reranker.text_kind

    def candidates(self, questions: list[str], atoms: list[AtomRecord], keys: np.ndarray,
                   vectors: np.ndarray | None = None) -> list[list[RoutedAtom]]:
        """Per question, the stage-1 top-K of `atoms` (keys [n, d]) weighed as the server weighs them
        (`vectors`: the questions already encoded)."""
        vectors = self.encoder.encode(questions) if vectors is None else vectors
        sims = vectors @ keys.T  # [Q, n]
        routed = []
        for question, row in zip(questions, sims):
            top = np.argsort(-row)[:TOP_K]
            hits = [(int(i), float(row[i])) for i in top]
            routed.append(weigh_candidates(question, hits, atoms, self.head, self.reranker, self.text_kind,
                                           stage2=self.reranker is not None))
        return routed

    def picks(self, candidates: list[RoutedAtom]) -> list[tuple[int, float]]:
        """What the server keeps of one question's candidates before the bank's threshold is known
        (DEFAULT_THRESHOLD): (row, weight) pairs. A question refuses where every candidate's weight is below
        the threshold: its top weight (candidates[0].weight) is what refusal calibration reads."""
        return [(c.index, round(c.weight, 3)) for c in keep_atoms(candidates, self.head, DEFAULT_THRESHOLD)]

    def spec_fields(self, threshold: float | None) -> dict[str, Any]:
        """The bank spec's routing fields: the head (with its refusal threshold) and the reranker."""
        identity = self.identity
        return {"router_head": asdict(replace(self.head, threshold=threshold)),
                "reranker": None if identity is None else identity.to_dict()}


def check_reranker(reranker: str | None) -> None:
    """A reranker folder named by the user exists and holds a reranker: checked before any model loads."""
    if reranker not in (None, *RERANKERS):
        require_folder(reranker, "reranker", "give a folder written by `doc2atom router train`",
                       files=(CARD, WEIGHTS))


def study_router(reranker: str | None, encoder: SentenceTransformerEncoder) -> StudyRouter:
    """`reranker`: "shipped" (the default), "none" / None (stage 1 only, as banks before rerankers), or a
    folder written by `doc2atom router train` (copied into every bank compiled with it)."""
    if reranker in (None, "none"):
        return StudyRouter(encoder)
    if reranker == "shipped":
        if shipped_identity() is None:
            raise InputError("this doc2atom ships no reranker: pass --reranker none or a trained one")
        return StudyRouter(encoder, load_reranker(SHIPPED_FOLDER))
    check_reranker(reranker)
    folder = Path(reranker)
    try:
        reranker = load_reranker(folder)
    except ValueError as err:
        raise InputError(f"{err}: give a folder written by `doc2atom router train`") from err
    shipped = reranker.identity == shipped_identity()
    return StudyRouter(encoder, reranker, copy_from=None if shipped else folder)
