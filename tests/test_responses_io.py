"""The Responses API wire format, checked with the official openai SDK and vLLM's own models (no server)."""

from __future__ import annotations

import copy
import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from vllm_doc2atom.errors import RequestError
from vllm_doc2atom.openai_io import extract_question, refusal_body, with_evidence
from vllm_doc2atom.responses_io import (
    responses_prepend,
    responses_question,
    responses_refusal_body,
    responses_refusal_events,
)

MESSAGE = "The documents do not answer this: no atom matched the question."
PROVENANCE = {"bank": "docs", "atoms": [], "refused": True}
PAYLOAD = {"model": "base", "input": "Who wrote it?", "atom_bank": "docs", "instructions": "Be brief.",
           "temperature": 0.3, "max_output_tokens": 64, "metadata": {"k": "v"}}


def _client(body: bytes, content_type: str) -> openai.OpenAI:
    """A real openai client whose every request gets `body` back."""
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/responses"
        assert json.loads(request.content)["atom_bank"] == "docs"
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    return openai.OpenAI(api_key="x", base_url="http://test/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def _create(client: openai.OpenAI, **kwargs):
    return client.responses.create(model="base", input="Who wrote it?", extra_body={"atom_bank": "docs"}, **kwargs)


# question extraction


@pytest.mark.parametrize("payload, question", [
    ({"input": "What is X?"}, "What is X?"),
    ({"input": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "second"}]}, "second"),
    ({"input": [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "What"}, {"type": "input_image", "image_url": "u"},
                             {"type": "input_text", "text": "is X?"}]}]}, "What is X?"),
    ({"input": [{"role": "user", "content": "q"},
                {"type": "function_call_output", "call_id": "c", "output": "o"}]}, "q"),
])
def test_question(payload, question):
    assert responses_question(payload) == question
    assert extract_question("responses", payload) == question


@pytest.mark.parametrize("payload", [
    {}, {"input": ""}, {"input": "  "}, {"input": 3}, {"input": []},
    {"input": [{"role": "assistant", "content": "a"}]},
    {"input": [{"role": "system", "content": "s"}, {"type": "function_call_output", "role": "user", "output": "o"}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": ""}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
    {"input": [{"role": "user", "content": None}]},
    {"input": [{"role": "user", "content": "q"}, {"role": "user", "content": " "}]},  # the last one is routed
])
def test_bad_question(payload):
    with pytest.raises(RequestError) as info:
        responses_question(payload)
    assert info.value.status == 400 and info.value.param == "input"


def test_prepend():
    assert responses_prepend({"input": "q?", "model": "m"}, "E: ") == {"input": "E: q?", "model": "m"}
    items = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "a"},
             {"type": "message", "role": "user",
              "content": [{"type": "input_image", "image_url": "u"}, {"type": "input_text", "text": "q?"},
                          {"type": "input_text", "text": "more"}]}]
    payload = {"input": items}
    before = copy.deepcopy(payload)
    out = responses_prepend(payload, "E: ")
    assert payload == before  # not mutated
    assert responses_question(out) == "E: q? more"
    assert out["input"][:2] == items[:2] and out["input"][2]["content"][0] == items[2]["content"][0]
    out = responses_prepend({"input": [{"role": "user", "content": "q?"}]}, "E: ")
    assert out["input"] == [{"role": "user", "content": "E: q?"}]
    assert responses_question(with_evidence("responses", {"input": "q?"}, ["a", "b"])).endswith("Question: q?")
    with pytest.raises(RequestError):
        responses_prepend({"input": []}, "E: ")


# refusal: not streamed


def test_refusal_body_parses_with_sdk():
    body = responses_refusal_body(PAYLOAD, MESSAGE, PROVENANCE)
    via_openai_io = Response.model_validate(json.loads(refusal_body("responses", PAYLOAD, MESSAGE, PROVENANCE)))
    assert via_openai_io.output_text == MESSAGE
    response = Response.model_validate(json.loads(body))
    assert response.output_text == MESSAGE
    assert response.id.startswith("resp_") and response.status == "completed" and response.model == "base"
    assert response.instructions == "Be brief." and response.temperature == 0.3
    assert response.max_output_tokens == 64 and response.metadata == {"k": "v"}
    assert response.usage.total_tokens == 0
    assert response.model_extra["doc2atom"] == PROVENANCE

    response = _create(_client(body, "application/json"))
    assert response.output_text == MESSAGE
    assert response.model_extra["doc2atom"] == PROVENANCE


def test_refusal_body_uses_request_id():
    body = json.loads(responses_refusal_body({**PAYLOAD, "request_id": "resp_mine"}, MESSAGE, PROVENANCE))
    assert body["id"] == "resp_mine"


# refusal: streamed


def _events(payload=PAYLOAD) -> list[bytes]:
    return responses_refusal_events(payload, MESSAGE, PROVENANCE)


def test_refusal_events_parse_with_sdk():
    raw = _events()
    adapter = TypeAdapter(ResponseStreamEvent)
    types = []
    for n, chunk in enumerate(raw):
        text = chunk.decode()
        assert text.endswith("\n\n")
        event_line, data_line = text.strip("\n").split("\n")
        event = adapter.validate_python(json.loads(data_line.removeprefix("data: ")))
        assert event_line == f"event: {event.type}" and event.sequence_number == n
        types.append(event.type)
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    assert b"[DONE]" not in b"".join(raw)


def test_refusal_stream_through_sdk_client():
    client = _client(b"".join(_events()), "text/event-stream")
    events = list(_create(client, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == MESSAGE
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.output_text == MESSAGE
    assert completed.response.model_extra["doc2atom"] == PROVENANCE
    assert events[0].response.status == "in_progress" and events[0].response.output == []

    # The SDK's own accumulating helper checks the events build one consistent response.
    with client.responses.stream(model="base", input="Who wrote it?", extra_body={"atom_bank": "docs"}) as stream:
        final = stream.get_final_response()
    assert final.output_text == MESSAGE


# the shape vLLM 0.32 itself gives


def _vllm_response(payload: dict, output: list, status: str, usage) -> dict:
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse

    request = ResponsesRequest(**{k: v for k, v in payload.items() if k != "atom_bank"})
    params = request.to_sampling_params(default_max_tokens=10_000)
    return ResponsesResponse.from_request(request, params, model_name=payload["model"], created_time=1,
                                          output=output, status=status,
                                          usage=usage).model_dump(mode="json", by_alias=True)


def _same(ours: dict, theirs: dict, ignore=("id", "created_at")) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours.keys() - set(ignore):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("payload", [
    PAYLOAD,
    {"model": "base", "input": "q", "max_output_tokens": 5, "include": ["message.output_text.logprobs"],
     "top_logprobs": 2, "top_p": 0.5, "user": "u", "parallel_tool_calls": False, "truncation": "auto",
     "presence_penalty": 0.5, "frequency_penalty": 0.1, "service_tier": "default", "background": False},
])
def test_same_shape_as_vllm(payload):
    pytest.importorskip("vllm")
    from openai.types.responses import ResponseOutputMessage
    from vllm.entrypoints.openai.responses.protocol import InputTokensDetails, OutputTokensDetails, ResponseUsage
    from vllm.entrypoints.openai.responses.streaming_events import (
        SimpleStreamingState,
        emit_simple_content_delta,
        emit_simple_content_done,
        emit_simple_content_open,
    )

    usage = ResponseUsage(input_tokens=0, output_tokens=0, total_tokens=0,
                          input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                          output_tokens_details=OutputTokensDetails())
    ours = json.loads(responses_refusal_body(payload, MESSAGE, PROVENANCE))
    assert ours.pop("doc2atom") == PROVENANCE
    message = ResponseOutputMessage.model_validate(ours["output"][0])
    _same(ours, _vllm_response(payload, [message], "completed", usage))
    assert ours["output"][0] == message.model_dump(mode="json")

    # Streamed: the same events, fields and values as vLLM's simple (non-harmony) streaming path.
    state = SimpleStreamingState()
    theirs = [e.model_dump(mode="json", by_alias=True) for e in
              emit_simple_content_open(state) + emit_simple_content_delta(state, MESSAGE)
              + emit_simple_content_done(state)]
    events = [json.loads(chunk.decode().split("data: ", 1)[1]) for chunk in _events(payload)]
    started = _vllm_response(payload, [], "in_progress", None)
    for event in events[:2]:
        _same(event["response"], started)
    for n, (event, their) in enumerate(zip(events[2:-1], theirs, strict=True), start=2):
        their = json.loads(json.dumps(their).replace(state.current_item_id, events[2]["item"]["id"]))
        assert event == {**their, "sequence_number": n}
    completed = events[-1]["response"]
    assert completed.pop("doc2atom") == PROVENANCE
    _same(completed, _vllm_response(payload, [events[-2]["item"]], "completed", usage))
