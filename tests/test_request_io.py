"""The OpenAI wire format in: the question a request routes, evidence placed before it, hostile JSON."""

from __future__ import annotations

import pytest

from vllm_doc2atom.errors import RequestError
from vllm_doc2atom.openai_io import extract_question


def test_question_extraction():
    chat = {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                         {"role": "user", "content": [{"type": "text", "text": "second"}]}]}
    assert extract_question("chat", chat) == "second"
    assert extract_question("completion", {"prompt": ["only one"]}) == "only one"
    with pytest.raises(RequestError, match="token ids"):
        extract_question("completion", {"prompt": [[1, 2]]})


def test_evidence_goes_before_the_routed_question_without_touching_the_request():
    from vllm_doc2atom.openai_io import with_evidence

    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text",
                                                                                       "text": "Who?"}]}]}
    rewritten = with_evidence("chat", chat, ["Ada wrote it.", "In 1901."])
    parts = rewritten["messages"][1]["content"]
    assert parts[0]["text"] == "Document:\nAda wrote it.\nIn 1901.\n\nQuestion: " and parts[1]["text"] == "Who?"
    assert chat["messages"][1]["content"] == [{"type": "text", "text": "Who?"}]  # the original is untouched
    completion = with_evidence("completion", {"prompt": ["Who?"]}, ["Ada wrote it."])
    assert completion["prompt"].startswith("Document:\nAda") and completion["prompt"].endswith("it.\n\nWho?")


def test_hostile_json_is_not_parsed():
    from vllm_doc2atom.asgi import parse_json

    assert parse_json(b"[" * 100_000) is None and parse_json(b'{"a": ' + b"[" * 10_000) is None
    assert parse_json(b'{"a": [[1]], "b": "[[[["}') == {"a": [[1]], "b": "[[[["}
    assert parse_json(b"not json") is None
