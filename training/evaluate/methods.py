"""The registry of evaluation methods: what each one compiles, how it is compiled and how it is served."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal


class Artifact(Enum):
    """What a method compiles from each held-out document."""

    NONE = "none"  # nothing: the base model alone, or reading the document (ICL)
    ROUTED = "routed"  # an atom bank, routed and composed per question by the plugin
    MONOLITHIC = "monolithic"  # one PEFT LoRA of all the document's atoms at weight 1 (Doc-to-LoRA baselines)


@dataclass(frozen=True)
class Method:
    name: str
    artifact: Artifact
    study: bool = False  # compiled by self-study with the base model: no checkpoint
    # Served with `atom_evidence` (its value here): the routed atoms' text before the question, besides the
    # composed adapter (True) or instead of it ("only"). Their banks are doc2atom_study's, compiled again under
    # their own names: the self-study cache makes that free.
    evidence: bool | Literal["only"] = False
    reranked: bool = True  # study banks: routed with the shipped reranker (False: stage 1 only, as before it)


# In the order `doc2atom eval --methods` lists them and the results show them.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("base", Artifact.NONE),
    Method("icl", Artifact.NONE),
    Method("d2l_raw", Artifact.MONOLITHIC),
    Method("d2l_atom", Artifact.MONOLITHIC),
    Method("d2l_study", Artifact.MONOLITHIC, study=True),
    Method("doc2atom", Artifact.ROUTED),
    Method("doc2atom_optimize", Artifact.ROUTED),
    Method("doc2atom_study", Artifact.ROUTED, study=True),
    Method("doc2atom_study_stage1", Artifact.ROUTED, study=True, reranked=False),
    Method("doc2atom_evidence", Artifact.ROUTED, study=True, evidence=True),
    Method("doc2atom_text", Artifact.ROUTED, study=True, evidence="only"),
)}
