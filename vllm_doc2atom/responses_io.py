"""OpenAI Responses API (`POST /v1/responses`) wire format: the question to route, evidence before it,
and refusal answers (plain or streamed) in the shape vLLM 0.32 gives them.

Kept free of heavy imports: the plugin is imported in every vLLM process.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .errors import RequestError

_LOGPROBS = "message.output_text.logprobs"
_NO_TEXT = "a request with `atom_bank` needs a user message with text to route in `input`"


def _user_item(payload: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """The index and item of the last user message in a list `input`."""
    items = payload.get("input")
    if not isinstance(items, list):
        return None
    for index in range(len(items) - 1, -1, -1):
        item = items[index]
        if isinstance(item, dict) and item.get("role") == "user" and item.get("type", "message") == "message":
            return index, item
    return None


def responses_question(payload: dict[str, Any]) -> str:
    """The text to route: a string `input`, or the text of the last user message in a list `input`."""
    items = payload.get("input")
    if isinstance(items, str):
        if items.strip():
            return items
        raise RequestError(_NO_TEXT, param="input")
    if not isinstance(items, list):
        raise RequestError("`input` must be a string or a list of input items", param="input")
    found = _user_item(payload)
    if found is None:
        raise RequestError(_NO_TEXT, param="input")
    content = found[1].get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "input_text"]
        if any(not isinstance(p.get("text"), str) for p in parts):
            raise RequestError("an `input_text` part's `text` must be a string", param="input")
        text = " ".join(p["text"] for p in parts)
    else:
        raise RequestError("a user message's `content` must be a string or a list of parts", param="input")
    if text.strip():
        return text
    raise RequestError(_NO_TEXT, param="input")


def responses_prepend(payload: dict[str, Any], text: str) -> dict[str, Any]:
    """A copy of the request whose routed user text (what `responses_question` reads) starts with `text`."""
    responses_question(payload)  # the same checks, so the item below exists and has text
    items = payload["input"]
    if isinstance(items, str):
        return {**payload, "input": text + items}
    index, item = _user_item(payload)  # type: ignore[misc]
    content = item["content"]
    if isinstance(content, str):
        content = text + content
    else:
        content = [dict(p) if isinstance(p, dict) else p for p in content]
        first = next(p for p in content if isinstance(p, dict) and p.get("type") == "input_text")
        first["text"] = text + first["text"]
    items = list(items)
    items[index] = {**item, "content": content}
    return {**payload, "input": items}


def _hex16() -> str:
    return uuid.uuid4().hex[:16]  # vLLM's ids: 16 hex digits


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _response(payload: dict[str, Any], response_id: str, created_at: int, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """A Response object as vLLM's `ResponsesResponse.from_request` fills it (with vLLM's defaults)."""
    tools = payload.get("tools") or []
    tool_choice = payload.get("tool_choice", "auto")
    if not tools and tool_choice in ("auto", "none"):
        tool_choice = "none"  # vLLM's check_tool_usage
    include = payload.get("include") or []
    return {
        "id": response_id, "created_at": created_at, "incomplete_details": None,
        "instructions": payload.get("instructions"), "metadata": payload.get("metadata"),
        "model": payload.get("model"), "object": "response", "output": output,
        "parallel_tool_calls": _default(payload.get("parallel_tool_calls"), True),
        "temperature": _default(payload.get("temperature"), 1.0),
        "tool_choice": tool_choice, "tools": tools,
        "top_p": _default(payload.get("top_p"), 1.0), "background": bool(payload.get("background")),
        # vLLM reports min(max_output_tokens, context left): with none asked, that is not known here
        "max_output_tokens": payload.get("max_output_tokens"),
        "max_tool_calls": payload.get("max_tool_calls"),
        "previous_response_id": payload.get("previous_response_id"), "prompt": None,
        "reasoning": payload.get("reasoning"), "service_tier": payload.get("service_tier") or "auto",
        "status": status, "text": payload.get("text"),
        "top_logprobs": (payload.get("top_logprobs") or 0) if _LOGPROBS in include else None,
        "truncation": payload.get("truncation", "disabled"), "usage": usage, "user": payload.get("user"),
        "presence_penalty": _default(payload.get("presence_penalty"), 0.0),
        "frequency_penalty": _default(payload.get("frequency_penalty"), 0.0),
        "kv_transfer_params": None, "ec_transfer_params": None,
        "input_messages": None, "output_messages": None,
    }


def _message(item_id: str, message: str) -> dict[str, Any]:
    part = {"annotations": [], "text": message, "type": "output_text", "logprobs": None}
    return {"id": item_id, "content": [part], "role": "assistant", "status": "completed", "type": "message",
            "phase": None}


_USAGE = {  # vLLM's ResponseUsage, all zero: no model call
    "input_tokens": 0,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "input_tokens_per_turn": [],
                             "cached_tokens_per_turn": []},
    "output_tokens": 0,
    "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0, "output_tokens_per_turn": [],
                              "tool_output_tokens_per_turn": []},
    "total_tokens": 0,
}


def _response_id(payload: dict[str, Any]) -> str:
    request_id = payload.get("request_id")  # vLLM answers with the caller's own request_id when given
    return request_id if isinstance(request_id, str) and request_id else f"resp_{_hex16()}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def responses_refusal_body(payload: dict[str, Any], message: str, provenance: dict[str, Any]) -> bytes:
    """A completed Response whose one output message is the refusal (no model call), plus `doc2atom`."""
    body = _response(payload, _response_id(payload), int(time.time()), "completed",
                     [_message(f"msg_{_hex16()}", message)], _USAGE)
    return _dumps({**body, "doc2atom": provenance}).encode()


def responses_refusal_events(payload: dict[str, Any], message: str,
                             provenance: dict[str, Any]) -> list[bytes]:
    """The refusal as the server-sent events vLLM streams for one text message (`event:` + `data:` lines).

    `doc2atom` provenance rides in the response.completed event's response. No `[DONE]`: vLLM sends none.
    """
    response_id, created_at, item_id = _response_id(payload), int(time.time()), f"msg_{_hex16()}"
    started = _response(payload, response_id, created_at, "in_progress", [], None)
    item = _message(item_id, message)
    part = item["content"][0]
    at = {"content_index": 0, "item_id": item_id, "output_index": 0}
    events: list[dict[str, Any]] = [
        {"response": started, "type": "response.created"},
        {"response": started, "type": "response.in_progress"},
        {"item": {**item, "content": [], "status": "in_progress"}, "output_index": 0,
         "type": "response.output_item.added"},
        {**at, "part": {**part, "text": "", "logprobs": []}, "type": "response.content_part.added"},
        {**at, "delta": message, "logprobs": [], "type": "response.output_text.delta"},
        {**at, "logprobs": [], "text": message, "type": "response.output_text.done"},
        {**at, "part": part, "type": "response.content_part.done"},
        {"item": item, "output_index": 0, "type": "response.output_item.done"},
        {"response": {**_response(payload, response_id, created_at, "completed", [item], _USAGE),
                      "doc2atom": provenance}, "type": "response.completed"},
    ]
    return [f"event: {e['type']}\ndata: {_dumps({**e, 'sequence_number': n})}\n\n".encode()
            for n, e in enumerate(events)]
