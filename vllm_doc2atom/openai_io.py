"""OpenAI wire format: the question inside a request, error bodies, and refusal answers (plain or streamed)."""

from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus
from typing import Any

from .errors import RequestError

# Routes whose requests may name an atom bank, and the response object each produces.
ROUTED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/responses": "responses"}
# Where the refusal and the provenance go in a response body of each kind.
RESPONSE_OBJECTS = ("chat.completion", "text_completion", "response")


def extract_question(kind: str, payload: dict[str, Any]) -> str:
    """The text to route: the last user message (chat, responses) or the prompt (completions)."""
    if kind == "responses":
        from .responses_io import responses_question

        return responses_question(payload)
    if kind == "chat":
        message = _last_user_message(payload)
        content = message.get("content") if message else None
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = " ".join(p["text"] for p in content
                            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        else:
            text = ""
        if text.strip():
            return text
        raise RequestError("a request with `atom_bank` needs a user message with text to route", param="messages")
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise RequestError("a request with `atom_bank` takes one prompt (each prompt needs its own routing)",
                           param="prompt")
    if isinstance(prompt, list):
        raise RequestError("a prompt given as token ids cannot be routed: send it as text with `atom_bank`",
                           param="prompt")
    raise RequestError("a request with `atom_bank` needs a non-empty text `prompt`", param="prompt")


def _last_user_message(payload: dict[str, Any]) -> dict[str, Any] | None:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise RequestError("`messages` must be a list", param="messages")
    return next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)


def with_evidence(kind: str, payload: dict[str, Any], evidence: list[str]) -> dict[str, Any]:
    """The request with the routed atoms' own text put before the question it routed, in the layout the base
    model reads whole documents in during self-study and in the evaluation's ICL prompt ("Document: <text>
    Question: <question>"): chosen over a bulleted "Evidence:" list on validation documents."""
    text = "Document:\n" + "\n".join(e.strip() for e in evidence) + "\n\n"
    if kind == "completion":  # a prompt to continue, not necessarily a question
        prompt = payload["prompt"]
        return {**payload, "prompt": text + (prompt[0] if isinstance(prompt, list) else prompt)}
    text += "Question: "
    if kind == "responses":
        from .responses_io import responses_prepend

        return responses_prepend(payload, text)
    messages = [dict(m) if isinstance(m, dict) else m for m in payload["messages"]]
    message = _last_user_message({"messages": messages})
    content = message["content"]
    message["content"] = (text + content if isinstance(content, str)
                          else [{"type": "text", "text": text}, *content])
    return {**payload, "messages": messages}


def error_body(message: str, status: int, param: str | None = None) -> bytes:
    phrase = HTTPStatus(status).phrase.replace(" ", "")
    return json.dumps({"error": {"message": message, "type": f"{phrase}Error" if status < 500 else phrase,
                                 "param": param, "code": status}}).encode()


def _choices(kind: str, n: int, text: str, delta: bool) -> list[dict[str, Any]]:
    if kind == "chat":
        key = "delta" if delta else "message"
        return [{"index": i, key: {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": "stop"} for i in range(n)]
    return [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i in range(n)]


def refusal_body(kind: str, payload: dict[str, Any], message: str, provenance: dict[str, Any]) -> bytes:
    """A complete OpenAI response whose every choice is the refusal message (no model call)."""
    if kind == "responses":
        from .responses_io import responses_refusal_body

        return responses_refusal_body(payload, message, provenance)
    n = int(payload.get("n") or 1)
    prefix, obj = ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
    return json.dumps({
        "id": f"{prefix}-d2a-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
        "model": payload.get("model"), "choices": _choices(kind, n, message, delta=False),
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "doc2atom": provenance,
    }).encode()


def refusal_events(kind: str, payload: dict[str, Any], message: str, provenance: dict[str, Any]) -> list[bytes]:
    """The same refusal as server-sent events: one chunk per choice, optional usage, [DONE]."""
    if kind == "responses":
        from .responses_io import responses_refusal_events

        return responses_refusal_events(payload, message, provenance)
    n = int(payload.get("n") or 1)
    prefix, obj = ("chatcmpl", "chat.completion.chunk") if kind == "chat" else ("cmpl", "text_completion")
    base = {"id": f"{prefix}-d2a-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": payload.get("model")}
    events = [{**base, "choices": _choices(kind, n, message, delta=True), "doc2atom": provenance}]
    if (payload.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                        "total_tokens": 0}})
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
