"""Stress: N mixed concurrent requests against a real `vllm serve --plugin doc2atom`, banks changing on disk.

    .venv/bin/python benchmarks/stress.py --requests 1000 [--concurrency 16] [--seed 0] [--model DIR]

It builds a tiny random Llama (or takes --model), several untrained banks of the example documents in a temp
bank root, and starts `vllm serve MODEL --plugin doc2atom --doc2atom-adapter-cache 2 --api-key K` (fp32,
short context). Then --concurrency clients send a seeded random mix of requests, through the `openai` SDK
(AsyncOpenAI) or raw httpx:
  valid     chat / completions (streamed or not, n=1 or 2), in-scope questions (routed) and off-topic ones
            (refused); a list of two compatible banks; the Responses API (streamed or not); atom_evidence
            (true and "only"); streams the client cancels after the first chunk; duplicate Authorization
            headers, right key first
  mutable   requests on banks that a background task changes during the run: swapped for a freshly built
            bank (atomic), documents removed and added back, shards corrupted in place (NaN bytes,
            truncated, deleted)
  invalid   unknown bank, "../etc", a NUL in the name, a 300-character name, banks that cannot be routed
            together, atom_evidence "yes", n="abc", max_tokens=-5, malformed and deeply nested JSON,
            a wrong API key, duplicate Authorization headers (wrong key first), atom_bank sent to
            /v1/chat/completions/batch and /invocations

Every request records its category, HTTP status (or exception) and latency. A 200 answer from a bank that is
never corrupted is WRONG when a choice's text is empty, provenance is missing (`x-doc2atom-provenance`
header; `doc2atom` field of non-streamed JSON) or names another bank, or the refusal does not match the
question (off-topic must be refused, in-scope must be routed; not judged on the bank whose documents change).
Generation uses ignore_eos and, for the tiny model, a logit bias against tokens that print nothing alone (an
untrained model repeats lone UTF-8 bytes or special tokens), so an empty text is never the model's doing.
Mutations are spread evenly over the run; clients pause for one that falls behind, so each lands mid-run.
After the run it counts composed-adapter folders (`*/d2a-*`) in --doc2atom-adapter-dir while the server is
up (at most the cache size, nothing in flight) and after shutdown (none).

Exit code 1 on any 5xx, transport error (connection dropped, error inside a 200 stream), unexpected status,
wrong answer, or adapter folders left beyond the cache size. Results: a table on stdout and JSON at --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DOCS = ROOT / "examples" / "docs"
API_KEY = "stress-key"
ADAPTER_CACHE = 2
MAX_TOKENS = 8
PROVENANCE = "x-doc2atom-provenance"
REFUSAL = "I can't answer that from the documents in this atom bank."  # the server's default refusal
IN_SCOPE = (
    "How tall is the Amber Needle lighthouse?",
    "Who wrote the Velmora Orchard Protocol?",
    "Which comet did astronomers at Brightwater discover?",
)
OFF_TOPIC = (
    "What is the best way to cook risotto?",
    "How do I change a flat bicycle tire?",
    "Which programming language should I learn first?",
)
BODY_EXCERPT = 300
REQUEST_TIMEOUT = 300.0


# ---- banks -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BankNames:
    healthy: tuple[str, ...] = ("docs", "team/b1", "team/b2")  # never touched
    pair: tuple[str, str] = ("team/b1", "team/b2")  # compatible: routed together
    wide: str = "wide"  # other targets and rank: cannot be routed together with `docs`
    swapped: str = "mut/swapped"  # replaced by a freshly built bank (same documents) during the run
    edited: str = "mut/edited"  # documents removed and added back during the run
    corrupt: tuple[str, str] = ("mut/corrupt-nan", "mut/corrupt-cut")  # shards damaged in place


class MemoEncoder:
    """The packaged sentence encoder, remembering what it encoded: the banks rebuilt during the run re-encode
    the same atoms, and a rebuild must take file-writing time, not seconds of CPU beside the server."""

    def __init__(self) -> None:
        from vllm_doc2atom.encoders import SentenceTransformerEncoder

        self.inner = SentenceTransformerEncoder()
        self.identity, self.dim = self.inner.identity, self.inner.dim
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.inner.encode(new), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else self.inner.encode([])


class BankFactory:
    """Untrained banks of the example documents (training.untrained_bank), as tests/serving.py builds them."""

    def __init__(self, model_dir: Path, root: Path) -> None:
        from training.untrained_bank import default_spec

        self.root = root
        self.encoder = MemoEncoder()
        self.documents = {p.stem: p.read_text() for p in sorted(EXAMPLE_DOCS.glob("*.md"))}
        modules = ("q_proj", "v_proj", "down_proj")
        self.spec = default_spec(model_dir, self.encoder, modules=modules, last_layers=2)
        self.wide_spec = default_spec(model_dir, self.encoder, last_layers=2, micro_rank=4)

    def build(self, name: str, seed: int, wide: bool = False) -> None:
        """Build (or atomically replace) bank `name`; large random factors, like the test server's."""
        from training.untrained_bank import build_untrained_bank

        spec = self.wide_spec if wide else self.spec
        build_untrained_bank(self.root / name, spec, self.documents, self.encoder, seed=seed, scale=0.3,
                             overwrite=True)

    def document(self, doc_id: str, seed: int):
        """One example document as DocumentAtoms in the default spec's layout (for AtomBank.add_documents)."""
        import torch

        from training.atomize.rules import RuleAtomizer, RuleAtomizerConfig
        from training.untrained_bank import random_tensors
        from vllm_doc2atom.bank import DocumentAtoms

        atoms = RuleAtomizer(RuleAtomizerConfig(split_clauses=False))(doc_id, self.documents[doc_id])
        keys = torch.from_numpy(self.encoder.encode([a.retrieval_text for a in atoms]))
        return DocumentAtoms(doc_id, atoms, random_tensors(self.spec, keys, seed, scale=0.3))

    def build_all(self, names: BankNames) -> None:
        every = [*names.healthy, names.swapped, names.edited, *names.corrupt]
        for seed, name in enumerate(every):
            self.build(name, seed)
        self.build(names.wide, 100, wide=True)


# ---- bank mutations on disk, during the run ----------------------------------------------------------------


@dataclass
class Mutation:
    action: str
    bank: str
    after_requests: int = 0  # requests completed when it ran
    at_s: float = 0.0  # seconds since the run started
    detail: str = ""
    error: str | None = None


def overwrite_shard(shard: Path) -> None:
    """Tensor bytes overwritten in place with 0xFF (NaN), same size, valid safetensors header."""
    with open(shard, "r+b") as f:
        header = struct.unpack("<Q", f.read(8))[0]
        size = shard.stat().st_size - 8 - header
        f.seek(8 + header)
        f.write(b"\xff" * size)


class Mutator:
    """Applies a fixed sequence of bank mutations, spread evenly over the run by requests completed."""

    def __init__(self, factory: BankFactory, names: BankNames, rng: random.Random) -> None:
        self.factory = factory
        self.rng = rng
        self.root = factory.root
        self.removed: list[str] = []
        swapped, edited, (nan, cut) = names.swapped, names.edited, names.corrupt
        self.plan = [Mutation("swap", swapped), Mutation("remove_document", edited),
                     Mutation("corrupt_overwrite", nan), Mutation("swap", swapped),
                     Mutation("add_document", edited), Mutation("corrupt_truncate", cut),
                     Mutation("swap", swapped), Mutation("remove_document", edited),
                     Mutation("corrupt_delete", cut), Mutation("add_document", edited)]

    def milestones(self, total: int) -> list[int]:
        """Requests completed before each mutation: evenly spread over the run."""
        return [total * step // (len(self.plan) + 1) for step in range(1, len(self.plan) + 1)]

    async def run(self, progress: Progress, total: int, started: float) -> list[Mutation]:
        for mutation, milestone in zip(self.plan, self.milestones(total), strict=True):
            await progress.wait_for(milestone)
            mutation.after_requests, mutation.at_s = progress.done, round(time.perf_counter() - started, 3)
            try:
                mutation.detail = await asyncio.to_thread(self.apply, mutation)
            except Exception as exc:  # a mutation that fails is reported, the run goes on
                mutation.error = f"{type(exc).__name__}: {exc}"[:BODY_EXCERPT]
            finally:
                await progress.mutated()
        return self.plan

    def apply(self, mutation: Mutation) -> str:
        from vllm_doc2atom.bank import AtomBank

        path = self.root / mutation.bank
        if mutation.action == "swap":
            seed = self.rng.randrange(1000, 10**6)
            self.factory.build(mutation.bank, seed)
            return f"rebuilt with seed {seed}"
        if mutation.action == "remove_document":
            bank = AtomBank.load(path)
            doc_id = self.rng.choice(bank.document_ids)
            bank.remove_documents([doc_id])
            self.removed.append(doc_id)
            return f"removed {doc_id}"
        if mutation.action == "add_document":
            doc_id = self.removed.pop()
            AtomBank.load(path).add_documents([self.factory.document(doc_id, self.rng.randrange(10**6))])
            return f"added {doc_id}"
        shard = self.rng.choice(sorted((path / "shards").glob("*.safetensors")))
        if mutation.action == "corrupt_overwrite":
            overwrite_shard(shard)
        elif mutation.action == "corrupt_truncate":
            shard.write_bytes(shard.read_bytes()[:100])
        elif mutation.action == "corrupt_delete":
            shard.unlink()
        else:
            raise ValueError(f"unknown mutation {mutation.action}")
        return f"{mutation.action.removeprefix('corrupt_')} {shard.name}"


class Progress:
    """Requests completed and mutations applied so far: the mutator waits for its milestones, and the clients
    wait for a mutation that falls behind (so that every mutation lands while requests are in flight)."""

    def __init__(self) -> None:
        self.done = 0
        self.mutations = 0
        self._changed = asyncio.Condition()

    async def step(self) -> None:
        async with self._changed:
            self.done += 1
            self._changed.notify_all()

    async def mutated(self) -> None:
        async with self._changed:
            self.mutations += 1
            self._changed.notify_all()

    async def wait_for(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.done >= count)

    async def wait_mutations(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.mutations >= count)


# ---- the request mix ---------------------------------------------------------------------------------------


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


class Mix:
    """The seeded random request mix: category -> (group, weight, factory)."""

    def __init__(self, names: BankNames, model: str, rng: random.Random, sampling: dict[str, Any]) -> None:
        self.names, self.model, self.rng, self.sampling = names, model, rng, sampling
        b = names
        valid: dict[str, Callable[[], dict]] = {
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
        mutable: dict[str, Callable[[], dict]] = {
            "swapped_bank": lambda: self.mutable(b.swapped, "full"),
            "edited_bank": lambda: self.mutable(b.edited, "no_scope"),
            "corrupted_bank": lambda: self.mutable(self.pick(*b.corrupt), "status"),
            "corrupted_in_list": lambda: self.mutable([b.pair[0], self.pick(*b.corrupt)], "status"),
        }
        invalid: dict[str, Callable[[], dict]] = {
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
        self.categories: dict[str, tuple[str, float, Callable[[], dict]]] = {}
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

    # -- building blocks

    def pick(self, *options):
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
            extra: dict | None = None, check: str = "full", expect: tuple[int, ...] = (200,)) -> dict:
        question, in_scope = self.question()
        n = 2 if endpoint != "responses" and self.rng.random() < 0.25 else 1
        return dict(endpoint=endpoint, bank=bank, question=question, in_scope=in_scope, stream=stream, n=n,
                    cancel=cancel, extra=extra or {}, check=check, expect=expect)

    def mutable(self, bank: Any, check: str) -> dict:
        return self.sdk(self.endpoint(), bank, stream=self.rng.random() < 0.3, check=check,
                        expect=MUTABLE_STATUSES)

    def bad_sdk(self, status: int, bank: Any = "docs", **fields: Any) -> dict:
        question, in_scope = self.question()
        return dict(endpoint="chat", bank=bank, question=question, in_scope=in_scope, check="status",
                    expect=(status,), **fields)

    def chat_body(self, **fields: Any) -> bytes:
        return json.dumps({"model": self.model, "messages": [self.message()], "max_tokens": MAX_TOKENS,
                           "atom_bank": "docs", **fields}).encode()

    def batch_body(self) -> bytes:
        return json.dumps({"model": self.model, "messages": [[self.message()]], "atom_bank": "docs"}).encode()

    def bad_raw(self, status: int, body: bytes, path: str = "/v1/chat/completions") -> dict:
        return dict(endpoint="raw", check="status", expect=(status,),
                    raw=RawRequest(path, body, [("Authorization", f"Bearer {API_KEY}")]))

    def raw_chat(self, bank: str, auth: list[str], expect: int = 200) -> dict:
        question, in_scope = self.question()
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": question}],
                           "max_tokens": MAX_TOKENS, "temperature": 0, "atom_bank": bank,
                           **self.sampling}).encode()
        headers = [("Authorization", f"Bearer {key}") for key in auth]
        return dict(endpoint="raw", bank=bank, question=question, in_scope=in_scope, expect=(expect,),
                    check="full" if expect == 200 else "status",
                    raw=RawRequest("/v1/chat/completions", body, headers))


# ---- sending -----------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None = None
    error: str | None = None  # exception (no status, or inside a 200 stream)
    body: str = ""  # excerpt of a non-200 body
    header: str | None = None  # x-doc2atom-provenance
    body_provenance: Any = None  # the `doc2atom` field of non-streamed JSON
    texts: list[str] | None = None  # one per choice
    cancelled: bool = False


@dataclass
class Clients:
    url: str
    model: str
    sdk: dict[str, openai.AsyncOpenAI]  # by API key
    http: httpx.AsyncClient
    sampling: dict[str, Any]  # body fields of every generating request (see sampling_fields)


async def send(clients: Clients, plan: Plan) -> Reply:
    try:
        if plan.endpoint == "raw":
            return await send_raw(clients, plan)
        return await send_sdk(clients, plan)
    except openai.APIStatusError as exc:
        return Reply(status=exc.status_code, body=exc.response.text[:BODY_EXCERPT])
    except Exception as exc:
        return Reply(error=f"{type(exc).__name__}: {exc}"[:BODY_EXCERPT])


async def send_sdk(clients: Clients, plan: Plan) -> Reply:
    if plan.api_key not in clients.sdk:
        clients.sdk[plan.api_key] = openai.AsyncOpenAI(base_url=clients.url + "/v1", api_key=plan.api_key,
                                                       max_retries=0, timeout=REQUEST_TIMEOUT,
                                                       http_client=clients.http)
    client = clients.sdk[plan.api_key]
    extra_body = {"atom_bank": plan.bank, **clients.sampling, **plan.extra}
    temperature = 1.0 if plan.n > 1 else 0.0  # vLLM refuses n > 1 with greedy sampling
    common = dict(model=clients.model, temperature=temperature, stream=plan.stream, extra_body=extra_body)
    if plan.endpoint == "chat":
        raw = await client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": plan.question}], max_tokens=plan.max_tokens, n=plan.n,
            **common)
    elif plan.endpoint == "completions":
        raw = await client.completions.with_raw_response.create(
            prompt=plan.question, max_tokens=plan.max_tokens, n=plan.n, **common)
    else:
        raw = await client.responses.with_raw_response.create(
            input=plan.question, max_output_tokens=2 * plan.max_tokens, **common)
    reply = Reply(status=raw.status_code, header=raw.headers.get(PROVENANCE))
    parsed = raw.parse()
    if plan.stream:
        await read_stream(parsed, plan, reply)
    else:
        reply.texts = texts_of(parsed, plan.endpoint)
        reply.body_provenance = (parsed.model_extra or {}).get("doc2atom")
    return reply


def texts_of(parsed: Any, endpoint: str) -> list[str]:
    if endpoint == "chat":
        return [c.message.content or "" for c in sorted(parsed.choices, key=lambda c: c.index)]
    if endpoint == "completions":
        return [c.text or "" for c in sorted(parsed.choices, key=lambda c: c.index)]
    return [parsed.output_text or ""]


async def read_stream(stream: Any, plan: Plan, reply: Reply) -> None:
    texts: dict[int, str] = defaultdict(str)
    try:
        async for event in stream:
            if plan.endpoint == "responses":
                if event.type == "response.output_text.delta":
                    texts[0] += event.delta
                elif event.type in ("error", "response.failed"):
                    raise RuntimeError(f"stream event {event.type}: {str(event)[:200]}")
            else:
                for choice in event.choices:
                    part = choice.delta.content if plan.endpoint == "chat" else choice.text
                    texts[choice.index] += part or ""
            if plan.cancel:
                reply.cancelled = True
                break
    except Exception as exc:
        reply.error = f"in the stream: {type(exc).__name__}: {exc}"[:BODY_EXCERPT]
    finally:
        await stream.close()
    reply.texts = [texts[i] for i in sorted(texts)] if texts else [""]


async def send_raw(clients: Clients, plan: Plan) -> Reply:
    raw = plan.raw
    headers = httpx.Headers([("Content-Type", "application/json"), *raw.headers])
    response = await clients.http.post(clients.url + raw.path, content=raw.body, headers=headers,
                                       timeout=REQUEST_TIMEOUT)
    reply = Reply(status=response.status_code, header=response.headers.get(PROVENANCE))
    if response.status_code != 200:
        reply.body = response.text[:BODY_EXCERPT]
        return reply
    data = response.json()
    reply.texts = [(c.get("message") or {}).get("content") or "" for c in data.get("choices", [])]
    reply.body_provenance = data.get("doc2atom")
    return reply


# ---- judging -----------------------------------------------------------------------------------------------


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


async def run_one(clients: Clients, plan: Plan) -> Outcome:
    start = time.perf_counter()
    reply = await send(clients, plan)
    latency = time.perf_counter() - start
    problems = judge(plan, reply)
    provenance = None
    with contextlib.suppress(ValueError, TypeError):
        provenance = json.loads(reply.header) if reply.header else None
    return Outcome(index=plan.index, category=plan.category, group=plan.group, bank=plan.bank,
                   endpoint=plan.endpoint, stream=plan.stream, n=plan.n, status=reply.status,
                   latency_s=round(latency, 4), expected=reply.status in plan.expect, error=reply.error,
                   body=reply.body, cancelled=reply.cancelled, problems=problems, question=plan.question,
                   texts=[t[:120] for t in reply.texts] if problems and reply.texts else None,
                   provenance=provenance if problems else None)


async def run_all(clients: Clients, plans: list[Plan], concurrency: int, mutator: Mutator
                  ) -> tuple[list[Outcome], list[Mutation], float]:
    progress = Progress()
    outcomes: list[Outcome] = []
    queue = iter(plans)
    started = time.perf_counter()
    step = max(1, len(plans) // 10)
    milestones = mutator.milestones(len(plans))

    async def worker() -> None:
        for plan in queue:  # one shared iterator: each plan is sent once
            overdue = sum(m <= progress.done - concurrency for m in milestones)
            await progress.wait_mutations(overdue)
            outcomes.append(await run_one(clients, plan))
            await progress.step()
            if progress.done % step == 0:
                print(f"  {progress.done}/{len(plans)} requests, {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)

    mutations = asyncio.create_task(mutator.run(progress, len(plans), started))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return sorted(outcomes, key=lambda o: o.index), await mutations, wall


# ---- the server and its adapter folders --------------------------------------------------------------------


def count_adapter_folders(adapter_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(adapter_dir)) for p in adapter_dir.glob("*/d2a-*"))


async def settled_folders(adapter_dir: Path, limit: int, wait_s: float = 20.0) -> tuple[list[str], float]:
    """Folders once nothing is in flight: the last releases may land just after the client has its answer."""
    start = time.perf_counter()
    while True:
        folders = count_adapter_folders(adapter_dir)
        waited = time.perf_counter() - start
        if len(folders) <= limit or waited > wait_s:
            return folders, round(waited, 2)
        await asyncio.sleep(0.5)


def server_args(adapter_dir: Path) -> list[str]:
    return ["--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-num-seqs", "16",
            "--api-key", API_KEY, "--doc2atom-adapter-dir", str(adapter_dir),
            "--doc2atom-adapter-cache", str(ADAPTER_CACHE)]


def log_errors(log: Path, limit: int = 5) -> dict[str, Any]:
    """Tracebacks in the server log (the plugin logs every 500 with logger.exception)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    excerpts = ["\n".join(lines[max(0, i - 1):i + 25])[-1500:] for i in starts[:limit]]
    return {"tracebacks": len(starts), "excerpts": excerpts}


# ---- report ------------------------------------------------------------------------------------------------


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99])
    return {"p50_s": round(float(p50), 4), "p90_s": round(float(p90), 4), "p99_s": round(float(p99), 4),
            "n": len(seconds)}


def summarize(outcomes: list[Outcome], plans: list[Plan]) -> dict[str, Any]:
    expect = {p.category: sorted(set(p.expect)) for p in plans}
    by_category: dict[str, Any] = {}
    for category in sorted({o.category for o in outcomes}, key=lambda c: (outcomes_group(outcomes, c), c)):
        rows = [o for o in outcomes if o.category == category]
        by_category[category] = {
            "group": rows[0].group, "n": len(rows), "expected_status": expect[category],
            "outcomes": dict(Counter(o.outcome for o in rows).most_common()),
            "unexpected": sum(not o.expected for o in rows), "wrong": sum(bool(o.problems) for o in rows),
            "latency": percentiles([o.latency_s for o in rows]),
        }

    def brief(o: Outcome, **more: Any) -> dict[str, Any]:
        return {"index": o.index, "category": o.category, "bank": o.bank, "endpoint": o.endpoint,
                "stream": o.stream, "status": o.status, **more}

    return {
        "by_category": by_category,
        "latency": percentiles([o.latency_s for o in outcomes]),
        "server_errors": [brief(o, body=o.body) for o in outcomes if (o.status or 0) >= 500],
        "transport_errors": [brief(o, error=o.error) for o in outcomes if o.error],
        "unexpected_statuses": [brief(o, expected=expect[o.category], body=o.body)
                                for o in outcomes if not o.expected and o.status is not None
                                and o.status < 500],
        "wrong_answers": [brief(o, question=o.question, n=o.n, problems=o.problems, texts=o.texts,
                                provenance=o.provenance) for o in outcomes if o.problems],
    }


def outcomes_group(outcomes: list[Outcome], category: str) -> int:
    group = next(o.group for o in outcomes if o.category == category)
    return ("valid", "mutable", "invalid").index(group)


def failures(summary: dict[str, Any], folders: dict[str, Any]) -> list[str]:
    found = []
    for key, label in (("server_errors", "5xx answers"), ("transport_errors", "transport errors"),
                       ("unexpected_statuses", "unexpected statuses"), ("wrong_answers", "wrong answers")):
        if summary[key]:
            found.append(f"{len(summary[key])} {label}")
    if len(folders["while_up"]) > folders["cache_size"]:
        found.append(f"{len(folders['while_up'])} adapter folders while up (cache {folders['cache_size']})")
    if folders["after_stop"]:
        found.append(f"{len(folders['after_stop'])} adapter folders left after shutdown")
    return found


def print_report(results: dict[str, Any]) -> None:
    print(f"\n{'category':<24} {'group':<8} {'n':>5} {'expect':>11} {'unexp':>5} {'wrong':>5} "
          f"{'p50 s':>7} {'p90 s':>7} {'p99 s':>7}  outcomes")
    for category, row in results["by_category"].items():
        lat = row["latency"]
        expect = ",".join(map(str, row["expected_status"]))
        outcomes = " ".join(f"{k}:{v}" for k, v in row["outcomes"].items())
        print(f"{category:<24} {row['group']:<8} {row['n']:>5} {expect:>11} {row['unexpected']:>5} "
              f"{row['wrong']:>5} {lat['p50_s']:>7.3f} {lat['p90_s']:>7.3f} {lat['p99_s']:>7.3f}  {outcomes}")
    lat = results["latency"]
    unexpected, wrong = len(results["unexpected_statuses"]), len(results["wrong_answers"])
    print(f"{'all':<24} {'':<8} {lat['n']:>5} {'':>11} {unexpected:>5} {wrong:>5} "
          f"{lat['p50_s']:>7.3f} {lat['p90_s']:>7.3f} {lat['p99_s']:>7.3f}")
    print(f"\nwall {results['wall_s']:.1f} s, {results['requests_per_s']:.2f} requests/s, "
          f"concurrency {results['config']['concurrency']}")
    for m in results["mutations"]:
        print(f"  mutation after {m['after_requests']:>5} requests: {m['action']:<18} {m['bank']:<20} "
              f"{m['error'] or m['detail']}")
    folders = results["adapter_folders"]
    print(f"adapter folders: {len(folders['while_up'])} while up (cache {folders['cache_size']}, "
          f"settled after {folders['settle_s']} s), {len(folders['after_stop'])} after shutdown")
    print(f"server log: {results['server_log']['tracebacks']} tracebacks")
    for key in ("server_errors", "transport_errors", "unexpected_statuses", "wrong_answers"):
        for row in results[key][:10]:
            print(f"  {key[:-1]}: {json.dumps(row, default=str)[:400]}")
        if len(results[key]) > 10:
            print(f"  ... {len(results[key]) - 10} more {key} in the JSON")
    print("PASS" if not results["failures"] else "FAIL: " + "; ".join(results["failures"]))


# ---- main --------------------------------------------------------------------------------------------------


def sampling_fields(tiny_model: Path | None) -> dict[str, Any]:
    """ignore_eos: every routed answer generates MAX_TOKENS tokens. For the tiny random model also a -100
    logit bias on the tokens that decode to nothing printable alone (special tokens, UTF-8 fragments): an
    untrained model happily repeats a lone continuation byte, which vLLM's detokenizer never emits, and the
    answer would be empty for a reason that has nothing to do with the plugin."""
    if tiny_model is None:
        return {"ignore_eos": True}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]  # as vLLM does
    silent = [i for i, text in enumerate(texts) if not text or "\ufffd" in text]
    return {"ignore_eos": True, "logit_bias": {str(i): -100 for i in silent}}


async def exercise(url: str, model_dir: Path, names: BankNames, mutator: Mutator, args: argparse.Namespace,
                   rng: random.Random) -> tuple[list[Plan], list[Outcome], list[Mutation], float]:
    limits = httpx.Limits(max_connections=2 * args.concurrency + 4,
                          max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as http:
        probe = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, http_client=http)
        model = (await probe.models.list()).data[0].id
        sampling = sampling_fields(None if args.model else model_dir)
        clients = Clients(url, model, {API_KEY: probe}, http, sampling)
        plans = Mix(names, model, rng, sampling).plans(args.requests)
        # Warm-up outside the measurement: the encoder loads and kernels compile on the first routed request.
        await run_one(clients, Plan(-1, "warmup", "valid", (200,), "status", bank=names.healthy[0],
                                    question=IN_SCOPE[0]))
        outcomes, mutations, wall = await run_all(clients, plans, args.concurrency, mutator)
    return plans, outcomes, mutations, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests in the mix (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix and the mutations")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stress" / "stress.json"),
                        help="JSON results (default benchmarks/results/stress/stress.json)")
    parser.add_argument("--model", help="model folder to serve (default: a tiny random Llama)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (banks, server log)")
    args = parser.parse_args()

    from training.models import build_tiny_model
    from training.serve_process import vllm_server

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="doc2atom-stress-"))
    adapter_dir = work / "adapters"
    adapter_dir.mkdir()
    print(f"work folder: {work}", file=sys.stderr)
    model_dir = Path(args.model) if args.model else build_tiny_model(work / "tiny-llama", arch="llama")
    names = BankNames()
    factory = BankFactory(model_dir, work / "banks")
    factory.build_all(names)
    mutator = Mutator(factory, names, random.Random(args.seed + 1))
    log = work / "serve.log"
    with vllm_server(model_dir, factory.root, log, server_args(adapter_dir), max_model_len=512) as url:
        plans, outcomes, mutations, wall = asyncio.run(exercise(url, model_dir, names, mutator, args, rng))
        while_up, settle_s = asyncio.run(settled_folders(adapter_dir, ADAPTER_CACHE))
    after_stop = count_adapter_folders(adapter_dir)

    results: dict[str, Any] = {
        "config": {"requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                   "model": str(args.model or "tiny random llama (training.models.build_tiny_model)"),
                   "adapter_cache": ADAPTER_CACHE, "max_tokens": MAX_TOKENS},
        "wall_s": round(wall, 2), "requests_per_s": round(len(outcomes) / wall, 3),
        **summarize(outcomes, plans),
        "mutations": [asdict(m) for m in mutations],
        "adapter_folders": {"cache_size": ADAPTER_CACHE, "while_up": while_up, "settle_s": settle_s,
                            "after_stop": after_stop},
        "server_log": log_errors(log),
    }
    results["failures"] = failures(results, results["adapter_folders"])
    print_report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"saved {out}")
    if args.keep or results["failures"]:
        print(f"kept {work} (server log: {log})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
