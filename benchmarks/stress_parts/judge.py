"""Judging one answer: is a 200 right (provenance, banks, scope, texts), and the Outcome that records it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .client import Reply
from .common import PROVENANCE, REFUSAL
from .workload import Plan


@dataclass
class Outcome:
    index: int
    category: str
    group: str
    bank: Any
    endpoint: str
    stream: bool
    n: int
    status: int | None
    latency_s: float
    expected: bool  # the status is one the plan allows
    error: str | None = None
    body: str = ""
    cancelled: bool = False
    problems: list[str] = field(default_factory=list)  # why a 200 answer is wrong
    question: str = ""
    texts: list[str] | None = None
    provenance: Any = None

    @property
    def outcome(self) -> str:
        if self.status is None:
            return "exception"
        label = str(self.status)
        if self.error:
            label += "+stream_error"
        elif self.cancelled:
            label += "+cancelled"
        elif self.problems:
            label += "+wrong"
        return label


def judge(plan: Plan, reply: Reply) -> list[str]:
    """Why a 200 answer is wrong (empty: it is right, or not judged)."""
    if reply.status != 200 or reply.error or plan.check == "status":
        return []
    problems: list[str] = []
    provenance = parse_header(reply.header, problems)
    if not plan.stream and reply.body_provenance is None:
        problems.append("no `doc2atom` field in the JSON body")
    elif not plan.stream and provenance is not None and reply.body_provenance != provenance:
        problems.append("the `doc2atom` field differs from the header")
    if provenance is not None:
        check_banks(plan.bank, provenance, problems)
    if plan.cancel:
        return problems
    texts = reply.texts or []
    if len(texts) != plan.n:
        problems.append(f"{len(texts)} choices, asked n={plan.n}")
    if any(t == "" for t in texts):
        problems.append("empty text")
    if provenance is not None and plan.check == "full":
        check_scope(plan, provenance, texts, problems)
    asked = plan.extra.get("atom_evidence")
    if provenance is not None and asked in (True, "only") and not provenance.get("refused"):
        if provenance.get("evidence") != asked or (asked == "only") == ("adapter" in provenance):
            problems.append(f"atom_evidence={asked!r} asked, provenance says evidence={provenance.get('evidence')!r}, "
                            f"adapter={provenance.get('adapter')!r}")
    return problems


def parse_header(header: str | None, problems: list[str]) -> dict | None:
    if header is None:
        problems.append(f"no {PROVENANCE} header")
        return None
    try:
        provenance = json.loads(header)
    except ValueError:
        problems.append(f"{PROVENANCE} is not JSON: {header[:100]!r}")
        return None
    if not isinstance(provenance, dict):
        problems.append(f"{PROVENANCE} is not an object")
        return None
    return provenance


def check_banks(asked: Any, provenance: dict, problems: list[str]) -> None:
    if provenance.get("atom_bank") != asked:
        problems.append(f"provenance names bank {provenance.get('atom_bank')!r}, asked {asked!r}")
    if isinstance(asked, list):
        others = {a.get("atom_bank") for a in provenance.get("atoms", [])} - set(asked)
        if others:
            problems.append(f"atoms from banks {sorted(map(str, others))} not asked")


def check_scope(plan: Plan, provenance: dict, texts: list[str], problems: list[str]) -> None:
    refused = provenance.get("refused")
    if plan.in_scope and (refused or any(t == REFUSAL for t in texts)):
        problems.append("in-scope question refused")
    if not plan.in_scope and (refused is not True or any(t != REFUSAL for t in texts)):
        problems.append("off-topic question not refused")
    if not refused and not provenance.get("atoms"):
        problems.append("routed, but provenance lists no atoms")
