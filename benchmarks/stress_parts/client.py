"""Sending one planned request (openai SDK or raw httpx) and reading its answer into a Reply."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from .common import BODY_EXCERPT, PROVENANCE, REQUEST_TIMEOUT, error_text
from .workload import Plan


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
    sampling: dict[str, Any]  # body fields of every generating request (see runner.sampling_fields)


async def send(clients: Clients, plan: Plan) -> Reply:
    try:
        if plan.endpoint == "raw":
            return await send_raw(clients, plan)
        return await send_sdk(clients, plan)
    except openai.APIStatusError as exc:
        return Reply(status=exc.status_code, body=exc.response.text[:BODY_EXCERPT])
    except Exception as exc:
        return Reply(error=error_text(exc))


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
        reply.error = error_text(exc, prefix="in the stream: ")
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
