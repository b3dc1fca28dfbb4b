"""The seeded random request mix: what each request sends and which answers pass."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .common import API_KEY, IN_SCOPE, MAX_TOKENS, OFF_TOPIC, BankNames


@dataclass
class RawRequest:
    path: str
    body: bytes
    headers: list[tuple[str, str]]


@dataclass
class Plan:
    """One request to send, and what its answer must look like."""

    index: int
    category: str
    group: str  # valid | mutable | invalid
    expect: tuple[int, ...]  # statuses that pass
    check: str  # full | no_scope (documents change: any refusal is fine) | status (answer not judged)
    endpoint: str = "chat"  # chat | completions | responses | raw
    bank: Any = None
    question: str = ""
    in_scope: bool = False
    stream: bool = False
    n: int = 1
    cancel: bool = False  # close the stream after its first chunk
    max_tokens: int = MAX_TOKENS
    extra: dict[str, Any] = field(default_factory=dict)  # more body fields
    raw: RawRequest | None = None
    api_key: str = API_KEY


MUTABLE_STATUSES = (200, 404, 409, 422)
# Relative frequency of each category: its own, else its group's (about 58% valid, 22% mutable, 20% invalid).
GROUP_WEIGHTS = {"valid": 6.0, "mutable": 5.5, "invalid": 1.5}
WEIGHTS = {"chat": 12.0, "chat_stream": 8.0, "completions": 8.0, "dup_auth_right_first": 1.5}

PlanFields = dict[str, Any]  # keyword arguments of Plan beyond index, category and group


class Mix:
    """The seeded random request mix: category -> (group, weight, factory)."""

    def __init__(self, names: BankNames, model: str, rng: random.Random, sampling: dict[str, Any]) -> None:
        self.names, self.model, self.rng, self.sampling = names, model, rng, sampling
        b = names
        valid: dict[str, Callable[[], PlanFields]] = {
            "chat": lambda: self.sdk("chat", self.healthy()),
            "chat_stream": lambda: self.sdk("chat", self.healthy(), stream=True),
            "completions": lambda: self.sdk("completions", self.healthy()),
            "completions_stream": lambda: self.sdk("completions", self.healthy(), stream=True),
            "bank_list": lambda: self.sdk(self.endpoint(), list(b.pair), stream=self.rng.random() < 0.3),
            "responses": lambda: self.sdk("responses", self.healthy()),
            "responses_stream": lambda: self.sdk("responses", self.healthy(), stream=True),
            "evidence": lambda: self.sdk(self.endpoint(), self.healthy(), stream=self.rng.random() < 0.3,
                                         extra={"atom_evidence": True}),
            "evidence_only": lambda: self.sdk(self.endpoint(), self.healthy(), stream=self.rng.random() < 0.3,
                                              extra={"atom_evidence": "only"}),
            "cancelled_stream": lambda: self.sdk(self.endpoint(), self.healthy(), stream=True, cancel=True),
            "dup_auth_right_first": lambda: self.raw_chat(self.healthy(), [API_KEY, "wrong"]),
        }
        mutable: dict[str, Callable[[], PlanFields]] = {
            "swapped_bank": lambda: self.mutable(b.swapped, "full"),
            "edited_bank": lambda: self.mutable(b.edited, "no_scope"),
            "corrupted_bank": lambda: self.mutable(self.pick(*b.corrupt), "status"),
            "corrupted_in_list": lambda: self.mutable([b.pair[0], self.pick(*b.corrupt)], "status"),
        }
        invalid: dict[str, Callable[[], PlanFields]] = {
            "unknown_bank": lambda: self.bad_sdk(404, bank="no-such-bank"),
            "dotdot_bank": lambda: self.bad_sdk(400, bank="../etc"),
            "nul_in_name": lambda: self.bad_sdk(400, bank="do\x00cs"),
            "name_300_chars": lambda: self.bad_sdk(400, bank="b" * 300),
            "incompatible_list": lambda: self.bad_sdk(400, bank=[b.healthy[0], b.wide]),
            "evidence_not_bool": lambda: self.bad_sdk(400, extra={"atom_evidence": "yes"}),
            "max_tokens_negative": lambda: self.bad_sdk(400, max_tokens=-5),
            "wrong_api_key": lambda: self.bad_sdk(401, api_key="wrong-key"),
            "n_not_a_number": lambda: self.bad_raw(400, body=self.chat_body(n="abc")),
            "malformed_json": lambda: self.bad_raw(400, body=self.chat_body()[:-7]),
            "deeply_nested_json": lambda: self.bad_raw(400, body=self.pick(
                b"[" * 100_000, b'{"atom_bank": "docs", "x": ' + b"[" * 100_000)),
            "dup_auth_wrong_first": lambda: self.raw_chat(self.healthy(), ["wrong", API_KEY], expect=401),
            "bank_on_batch_endpoint": lambda: self.bad_raw(400, path="/v1/chat/completions/batch",
                                                           body=self.batch_body()),
            "bank_on_invocations": lambda: self.bad_raw(400, path="/invocations", body=self.chat_body()),
        }
        self.categories: dict[str, tuple[str, float, Callable[[], PlanFields]]] = {}
        for group, factories in (("valid", valid), ("mutable", mutable), ("invalid", invalid)):
            for name, factory in factories.items():
                self.categories[name] = (group, WEIGHTS.get(name, GROUP_WEIGHTS[group]), factory)

    def plans(self, count: int) -> list[Plan]:
        """`count` requests: every category once (when count allows), the rest drawn by weight, shuffled."""
        names = list(self.categories)
        weights = [self.categories[n][1] for n in names]
        chosen = names[:count] + self.rng.choices(names, weights, k=max(0, count - len(names)))
        self.rng.shuffle(chosen)
        plans = []
        for index, category in enumerate(chosen):
            group, _, factory = self.categories[category]
            plans.append(Plan(index=index, category=category, group=group, **factory()))
        return plans

    # -- building blocks (each draws from self.rng: their call order is part of the seeded mix)

    def pick(self, *options: Any) -> Any:
        return self.rng.choice(options)

    def endpoint(self) -> str:
        return self.rng.choice(("chat", "completions", "responses"))

    def healthy(self) -> str:
        return self.rng.choice(self.names.healthy)

    def question(self) -> tuple[str, bool]:
        in_scope = self.rng.random() < 0.6
        return self.rng.choice(IN_SCOPE if in_scope else OFF_TOPIC), in_scope

    def message(self) -> dict[str, str]:
        return {"role": "user", "content": self.question()[0]}

    def sdk(self, endpoint: str, bank: Any, stream: bool = False, cancel: bool = False,
            extra: dict[str, Any] | None = None, check: str = "full", expect: tuple[int, ...] = (200,)
            ) -> PlanFields:
        question, in_scope = self.question()
        n = 2 if endpoint != "responses" and self.rng.random() < 0.25 else 1
        return dict(endpoint=endpoint, bank=bank, question=question, in_scope=in_scope, stream=stream, n=n,
                    cancel=cancel, extra=extra or {}, check=check, expect=expect)

    def mutable(self, bank: Any, check: str) -> PlanFields:
        return self.sdk(self.endpoint(), bank, stream=self.rng.random() < 0.3, check=check,
                        expect=MUTABLE_STATUSES)

    def bad_sdk(self, status: int, bank: Any = "docs", **fields: Any) -> PlanFields:
        question, in_scope = self.question()
        return dict(endpoint="chat", bank=bank, question=question, in_scope=in_scope, check="status",
                    expect=(status,), **fields)

    def chat_body(self, **fields: Any) -> bytes:
        return json.dumps({"model": self.model, "messages": [self.message()], "max_tokens": MAX_TOKENS,
                           "atom_bank": "docs", **fields}).encode()

    def batch_body(self) -> bytes:
        return json.dumps({"model": self.model, "messages": [[self.message()]], "atom_bank": "docs"}).encode()

    def bad_raw(self, status: int, body: bytes, path: str = "/v1/chat/completions") -> PlanFields:
        return dict(endpoint="raw", check="status", expect=(status,),
                    raw=RawRequest(path, body, [("Authorization", f"Bearer {API_KEY}")]))

    def raw_chat(self, bank: str, auth: list[str], expect: int = 200) -> PlanFields:
        question, in_scope = self.question()
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": question}],
                           "max_tokens": MAX_TOKENS, "temperature": 0, "atom_bank": bank,
                           **self.sampling}).encode()
        headers = [("Authorization", f"Bearer {key}") for key in auth]
        return dict(endpoint="raw", bank=bank, question=question, in_scope=in_scope, expect=(expect,),
                    check="full" if expect == 200 else "status",
                    raw=RawRequest("/v1/chat/completions", body, headers))
