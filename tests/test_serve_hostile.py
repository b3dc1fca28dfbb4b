"""The served path under attack, against the shared real `vllm serve --plugin doc2atom` (see serving.py).

Every case here once broke the server or answered something vLLM alone would not have answered.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from vllm_doc2atom.settings import DEFAULT_REFUSAL

from .serving import API_KEY, IN_SCOPE, OFF_TOPIC, ask, metric, overwrite_factors

AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "Who wrote the Velmora Orchard Protocol?"


def _post(server, path: str, body, headers=None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server["url"] + path, content=content, timeout=300,
                      headers={"Content-Type": "application/json", **(AUTH if headers is None else headers)},
                      **kwargs)


def _chat(served_model, question=OFF_TOPIC, **fields):
    return {"model": served_model, "messages": [{"role": "user", "content": question}], "max_tokens": 4, **fields}


def _healthy(client, model) -> None:
    """The engine still answers correctly: the base model gives text, and its and a healthy bank's log-probs are
    finite (a NaN adapter once turned every answer empty and every log-prob request into a 400)."""
    base = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=4, temperature=0, logprobs=True)
    assert base.choices[0].message.content and base.usage.completion_tokens == 4
    routed = ask(client, model, QUESTION, logprobs=True).parse()
    assert not routed.model_extra["doc2atom"]["refused"] and routed.usage.completion_tokens == 8
    for reply in (base, routed):
        assert all(abs(t.logprob) < 1e4 for t in reply.choices[0].logprobs.content)


def _banks(server) -> dict:
    return {b["id"]: b for b in httpx.get(server["url"] + "/v1/atom_banks", headers=AUTH).json()["data"]}


# ---- a bank damaged on disk while loaded ---------------------------------------------------------------


def test_corrupt_shard_in_a_loaded_bank_is_422_and_never_reaches_the_engine(client, model, server, bank_root):
    assert ask(client, model, QUESTION, bank="poison").parse().choices  # loaded, one adapter composed
    for shard in (bank_root / "poison" / "shards").iterdir():
        overwrite_factors(shard)  # NaN factors, same size, valid header
    for question in set(IN_SCOPE) - {QUESTION}:  # selections not composed yet: the factors must be read
        with pytest.raises(openai.UnprocessableEntityError, match="corrupt"):
            ask(client, model, question, bank="poison")
    assert not _banks(server)["poison"]["ok"]
    _healthy(client, model)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_truncated_or_deleted_shard_is_422_for_that_bank_only(client, model, server, bank_root, damage):
    assert ask(client, model, QUESTION, bank=damage).parse().choices
    for shard in (bank_root / damage / "shards").iterdir():
        if damage == "deleted":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(openai.UnprocessableEntityError):
        ask(client, model, "How tall is the Amber Needle lighthouse?", bank=damage)
    entry = _banks(server)[damage]
    assert not entry["ok"] and "/" + damage not in entry["error"] and str(bank_root) not in entry["error"]
    _healthy(client, model)


# ---- the refusal path obeys vLLM's request validation ------------------------------------------------------

INVALID = {
    "n too large": {"n": 2_000_000},
    "n not a number": {"n": "abc"},
    "n a list": {"n": [1]},
    "n negative": {"n": -1},
    "max_tokens negative": {"max_tokens": -5},
    "stream not a boolean": {"stream": "sometimes"},
    "stream_options not an object": {"stream": True, "stream_options": "x"},
    "unknown model": {"model": "no-such-model"},
    "question longer than the context": {"messages": [{"role": "user", "content": "risotto " * 3000}]},
    "text part is a number": {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    "text part is a list": {"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]},
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_refused_requests_get_exactly_vllms_error(server, model, case):
    body = _chat(model, **INVALID[case])
    plain = _post(server, "/v1/chat/completions", body)  # vLLM alone
    banked = _post(server, "/v1/chat/completions", {**body, "atom_bank": "docs"})
    assert 400 <= plain.status_code < 500
    assert banked.status_code == plain.status_code and banked.json()["error"]["type"] == plain.json()["error"]["type"]
    assert "doc2atom" not in banked.text


def test_refusals_read_the_request_as_vllm_parses_it(client, model, server):
    reply = _post(server, "/v1/chat/completions", {**_chat(model, stream="no", n="2"), "atom_bank": "docs"})
    assert reply.headers["content-type"].startswith("application/json")  # "no" is false to vLLM
    assert [c["message"]["content"] for c in reply.json()["choices"]] == [DEFAULT_REFUSAL] * 2


def test_deeply_nested_json_is_a_400(server, client, model):
    response = _post(server, "/v1/chat/completions", b"[" * 100_000)
    assert response.status_code == 400
    response = _post(server, "/v1/chat/completions", b'{"atom_bank": "docs", "x": ' + b"[" * 100_000)
    assert response.status_code == 400
    _healthy(client, model)


@pytest.mark.parametrize("path,fields", [
    ("/v1/chat/completions", {"prompt_logprobs": 0}),
    ("/v1/chat/completions", {"echo": True}),  # vLLM scores an echoed prompt with top_logprobs (default 0)
    ("/v1/chat/completions", {"prompt_logprobs": 1, "atom_bank": "docs"}),
    ("/v1/completions", {"echo": True, "logprobs": 0}),
])
def test_prompt_logprobs_on_a_cpu_server_are_a_400_not_a_dead_engine(server, client, model, path, fields):
    body = _chat(model, QUESTION, **fields)
    if path == "/v1/completions":
        body = {"model": model, "prompt": QUESTION, "max_tokens": 4, **fields}
    response = _post(server, path, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_logprobs"
    assert "CPU" in response.json()["error"]["message"]
    _healthy(client, model)


def test_echo_without_log_probs_still_reaches_vllm(server, model):
    reply = _post(server, "/v1/completions", {"model": model, "prompt": QUESTION, "max_tokens": 2, "echo": True})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"].startswith(QUESTION)


# ---- authentication exactly as vLLM does it --------------------------------------------------------------


def test_duplicate_authorization_headers_are_read_as_vllm_reads_them(server, model):
    before = metric(server["url"], "doc2atom_requests_total")
    folders = sorted(p.name for p in server["adapters"].glob("*/d2a-*"))
    wrong_first = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {API_KEY}")]
    for path, body in (("/v1/chat/completions", _chat(model, "How tall is the Amber Needle lighthouse?")),
                       ("/v1/chat/completions", _chat(model))):
        response = httpx.post(server["url"] + path, json={**body, "atom_bank": "team/b3"},
                              headers=httpx.Headers(wrong_first), timeout=60)
        assert response.status_code == 401
    assert httpx.get(server["url"] + "/v1/atom_banks", headers=httpx.Headers(wrong_first)).status_code == 401
    assert metric(server["url"], "doc2atom_requests_total") == before
    assert sorted(p.name for p in server["adapters"].glob("*/d2a-*")) == folders  # nothing composed

    right_first = [("Authorization", f"Bearer {API_KEY}"), ("Authorization", "Bearer wrong")]
    response = httpx.post(server["url"] + "/v1/chat/completions", json={**_chat(model), "atom_bank": "docs"},
                          headers=httpx.Headers(right_first), timeout=60)
    assert response.status_code == 200 and json.loads(response.headers["x-doc2atom-provenance"])["refused"]


# ---- bank names and manifests that once gave 500 ----------------------------------------------------------

BAD_BANKS = {
    "NUL byte": ("do\x00cs", 400),
    "300 characters": ("b" * 300, 400),
    "1 MB name": ("b" * 1_000_000, 400),
    "symlink loop": ("loop", 400),
    "hidden folder": (".hidden", 400),
    "router head threshold not a number": ("bad-head", 422),
}


@pytest.mark.parametrize("case", sorted(BAD_BANKS))
def test_bad_bank_names_and_manifests_are_4xx(server, model, case):
    name, status = BAD_BANKS[case]
    response = _post(server, "/v1/chat/completions", {**_chat(model, QUESTION), "atom_bank": name})
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert len(message) < 1000 and "/tmp" not in message


def test_server_paths_never_appear_in_errors(server, model, bank_root):
    for name in ("nope", "corrupt", "other-model"):
        message = _post(server, "/v1/chat/completions", {**_chat(model, QUESTION), "atom_bank": name}).text
        assert str(bank_root) not in message


# ---- endpoints the plugin does not route refuse `atom_bank` -----------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": OFF_TOPIC}]]}),
    ("/v1/messages", {"messages": [{"role": "user", "content": OFF_TOPIC}], "max_tokens": 4}),
    ("/invocations", {"messages": [{"role": "user", "content": OFF_TOPIC}], "max_tokens": 4}),
    ("/v1/embeddings", {"input": OFF_TOPIC}),
])
def test_endpoints_that_do_not_route_refuse_a_bank(server, model, path, body):
    for bank in ("docs", "../etc"):
        response = _post(server, path, {**body, "model": model, "atom_bank": bank},
                         headers={} if path == "/invocations" else None)  # vLLM guards only /v1
        assert response.status_code == 400 and "atom_bank" in response.json()["error"]["message"]


# ---- composed adapters are internal ---------------------------------------------------------------------


def test_composed_adapters_are_hidden_and_cannot_be_called_directly(client, model):
    adapter = ask(client, model, QUESTION).parse().model_extra["doc2atom"]["adapter"]
    assert [m.id for m in client.models.list().data] == [model]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=2)


def test_adapters_left_by_dead_processes_are_swept(server):
    assert not (server["adapters"] / "999999999").exists()


# ---- the Responses API ------------------------------------------------------------------------------------


def test_responses_api_is_routed_streamed_or_not(client, model):
    raw = client.responses.with_raw_response.create(model=model, input=QUESTION, max_output_tokens=16,
                                                    extra_body={"atom_bank": "docs"})
    reply = raw.parse()
    provenance = json.loads(raw.headers["x-doc2atom-provenance"])
    assert not provenance["refused"] and reply.model == provenance["adapter"]
    assert reply.model_extra["doc2atom"] == provenance

    refused = client.responses.create(model=model, input=OFF_TOPIC, extra_body={"atom_bank": "docs"})
    assert refused.output_text == DEFAULT_REFUSAL and refused.model_extra["doc2atom"]["refused"]

    for question in (QUESTION, OFF_TOPIC):
        events = list(client.responses.create(model=model, input=question, max_output_tokens=16, stream=True,
                                              extra_body={"atom_bank": "docs"}))
        assert events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert (text == DEFAULT_REFUSAL) == (question == OFF_TOPIC)


# ---- several banks in one request, evidence prefix --------------------------------------------------------


def test_several_banks_route_over_the_union_of_their_atoms(client, model):
    provenance = ask(client, model, QUESTION, bank=["team/b1", "team/b2"]).parse().model_extra["doc2atom"]
    assert provenance["atom_bank"] == ["team/b1", "team/b2"] and provenance["atoms"]
    assert {a["atom_bank"] for a in provenance["atoms"]} <= {"team/b1", "team/b2"}
    assert ask(client, model, OFF_TOPIC, bank=["team/b1", "team/b2"]).parse().model_extra["doc2atom"]["refused"]
    with pytest.raises(openai.BadRequestError, match="cannot be routed together"):
        ask(client, model, QUESTION, bank=["docs", "wide"])  # other LoRA targets and rank


def test_evidence_puts_the_routed_atoms_text_before_the_question(client, model):
    plain = ask(client, model, QUESTION).parse()
    with_text = ask(client, model, QUESTION, extra={"atom_evidence": True}).parse()
    assert with_text.model_extra["doc2atom"]["evidence"] and "adapter" in with_text.model_extra["doc2atom"]
    assert with_text.usage.prompt_tokens > plain.usage.prompt_tokens + 5
    only = ask(client, model, QUESTION, extra={"atom_evidence": "only"}).parse()
    provenance = only.model_extra["doc2atom"]
    assert provenance["evidence"] == "only" and provenance["atoms"] and "adapter" not in provenance
    assert only.model == model and only.usage.prompt_tokens == with_text.usage.prompt_tokens  # base model, no LoRA
    for bad in ("yes", 1, ["only"]):
        with pytest.raises(openai.BadRequestError, match="atom_evidence"):
            ask(client, model, QUESTION, extra={"atom_evidence": bad})
