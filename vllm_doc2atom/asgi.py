"""Small ASGI plumbing for the middleware: read a body once and replay it, send a whole response, rewrite one."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Python's json recurses once per nesting level: far below the interpreter's limit, a hostile body is
# refused before it can raise RecursionError (vLLM then parses it and answers its own 400).
MAX_JSON_DEPTH = 256


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """The JSON value of a body, or None when it is not JSON (or nests too deeply to parse safely)."""
    if _depth_exceeds(body, MAX_JSON_DEPTH):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _depth_exceeds(body: bytes, limit: int) -> bool:
    """A cheap upper bound of the nesting depth (brackets inside strings count too: only ever too strict
    for bodies that are hundreds of brackets deep anyway)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for byte in body:
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the already-read body once, then defers to the client (disconnects)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def send_body(send: Send, status: int, body: bytes, headers: list | None = None,
                    content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def rewriting_json(send: Send, rewrite: Callable[[Any], Any], headers: list | None = None) -> Send:
    """A send() that buffers a 200 JSON response and sends rewrite(its value) instead; anything else (errors,
    event streams) passes through with `headers` added."""
    buffered: dict[str, Any] = {}

    async def rewriting_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response_headers = list(message.get("headers", []))
            content_type = dict(response_headers).get(b"content-type", b"")
            if message["status"] == 200 and content_type.startswith(b"application/json"):
                buffered["start"], buffered["body"] = message, b""
                return
            return await send({**message, "headers": response_headers + (headers or [])})
        if message["type"] == "http.response.body" and "start" in buffered:
            buffered["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            try:
                body = json.dumps(rewrite(json.loads(buffered["body"]))).encode()
            except ValueError:
                body = buffered["body"]
            kept = [(k, v) for k, v in buffered["start"].get("headers", []) if k.lower() != b"content-length"]
            await send({**buffered["start"], "headers": kept + [(b"content-length", str(len(body)).encode())]
                        + (headers or [])})
            return await send({"type": "http.response.body", "body": body})
        await send(message)

    return rewriting_send
