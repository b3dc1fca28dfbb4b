"""End to end: a real `vllm serve <tiny model> --plugin doc2atom` on loopback, driven with the openai SDK."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch

from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.settings import DEFAULT_REFUSAL

from .serving import API_KEY, EXAMPLE_DOCS, IN_SCOPE, OFF_TOPIC, POOL, ask, metric, vllm_server


def test_chat_answers_with_a_composed_adapter_and_provenance(client, model):
    for question, document in IN_SCOPE.items():
        raw = ask(client, model, question)
        reply = raw.parse()
        provenance = reply.model_extra["doc2atom"]
        assert json.loads(raw.headers["x-doc2atom-provenance"]) == provenance
        assert not provenance["refused"] and reply.model == provenance["adapter"]
        assert reply.usage.completion_tokens > 0  # (a random tiny model may emit only special tokens)
        assert document in {a["document_id"] for a in provenance["atoms"]}
        text = (EXAMPLE_DOCS / f"{document}.md").read_text()
        for atom in provenance["atoms"]:
            assert set(atom) >= {"id", "type", "weight", "document_id", "span"} and 0 < atom["weight"] <= 1
        spans = [a["span"] for a in provenance["atoms"] if a["document_id"] == document]
        assert all(0 <= s < e <= len(text) for s, e in spans)
        assert provenance["rank"] == 2 * len(provenance["atoms"])


def test_same_selection_reuses_the_registered_adapter(client, model):
    question = next(iter(IN_SCOPE))
    first = ask(client, model, question, bank="team/b1").parse().model_extra["doc2atom"]
    second = ask(client, model, question, bank="team/b1").parse().model_extra["doc2atom"]
    assert second["cache_hit"] and second["adapter"] == first["adapter"]
    other_bank = ask(client, model, question, bank="team/b2").parse().model_extra["doc2atom"]
    assert other_bank["adapter"] != first["adapter"]  # same atoms, other bank content: another adapter


def test_streaming_chat_and_completions(client, model):
    raw = ask(client, model, "Who wrote the Velmora Orchard Protocol?", stream=True)
    assert not json.loads(raw.headers["x-doc2atom-provenance"])["refused"]
    chunks = list(raw.parse())
    assert len(chunks) > 1 and chunks[-1].choices[0].finish_reason == "length"

    reply = client.completions.create(model=model, prompt="The Brightwater Observatory stands on", max_tokens=6,
                                      temperature=0.8, n=3, extra_body={"atom_bank": "docs"})
    assert len(reply.choices) == 3 and reply.model_extra["doc2atom"]["atoms"]
    stream = client.completions.create(model=model, prompt="The Brightwater Observatory stands on", max_tokens=6,
                                       temperature=0, stream=True, extra_body={"atom_bank": "docs"})
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"


def test_off_topic_questions_are_refused_without_a_model_call(client, model, server):
    tokens_before = metric(server["url"], "vllm:generation_tokens_total")
    reply = ask(client, model, OFF_TOPIC).parse()
    assert reply.choices[0].message.content == DEFAULT_REFUSAL
    assert reply.model_extra["doc2atom"] == {"atom_bank": "docs", "refused": True, "atoms": []}
    chunks = list(ask(client, model, OFF_TOPIC, stream=True, n=2, temperature=0.7).parse())  # vLLM: n > 1 samples
    assert sorted(c.choices[i].delta.content for c in chunks for i in range(len(c.choices))) == [DEFAULT_REFUSAL] * 2
    completion = client.completions.create(model=model, prompt=OFF_TOPIC, max_tokens=5,
                                           extra_body={"atom_bank": "docs"})
    assert completion.choices[0].text == DEFAULT_REFUSAL and completion.object == "text_completion"
    assert metric(server["url"], "vllm:generation_tokens_total") == tokens_before


def test_requests_without_a_bank_are_untouched(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": OFF_TOPIC}], max_tokens=5, temperature=0)
    reply = raw.parse()
    assert "x-doc2atom-provenance" not in raw.headers and "doc2atom" not in (reply.model_extra or {})
    assert reply.model == model and reply.choices[0].message.content != DEFAULT_REFUSAL


def test_list_banks(server):
    response = httpx.get(server["url"] + "/v1/atom_banks", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200
    banks = {b["id"]: b for b in response.json()["data"]}
    assert banks["docs"]["ok"] and banks["docs"]["atoms"] == 19 and banks["docs"]["documents"] == 3
    assert banks["team/b1"]["ok"] and not banks["corrupt"]["ok"] and not banks["other-model"]["ok"]
    assert "escape" not in banks or not banks["escape"]["ok"]
    assert httpx.get(server["url"] + "/v1/atom_banks").status_code == 401


BAD_REQUESTS = {
    "unknown bank": ({"atom_bank": "nope"}, 404, "unknown atom bank"),
    "parent path": ({"atom_bank": "../docs"}, 400, "without '..'"),
    "absolute path": ({"atom_bank": "/etc"}, 400, "relative path"),
    "symlink out": ({"atom_bank": "escape"}, 400, "outside the bank root"),
    "corrupt bank": ({"atom_bank": "corrupt"}, 422, "sha256 does not match"),
    "other base model": ({"atom_bank": "other-model"}, 409, "does not match the served model"),
    "bank not a string": ({"atom_bank": 5}, 400, "must be a non-empty string"),
    "bank as a list of numbers": ({"atom_bank": [1, 2]}, 400, "must be a non-empty string"),
    "no user message": ({"atom_bank": "docs", "messages": [{"role": "system", "content": "hi"}]}, 400,
                        "needs a user message"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(client, model, case):
    extra, status, message = BAD_REQUESTS[case]
    messages = extra.pop("messages", [{"role": "user", "content": "How tall is the Amber Needle?"}])
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body=extra)
    assert err.value.status_code == status
    body = err.value.response.json()["error"]
    assert message in body["message"] and body["code"] == status and body["type"].endswith("Error")
    assert ask(client, model, "Who wrote the Velmora Orchard Protocol?").parse().choices  # still serving


@pytest.mark.parametrize("prompt,message", [([1, 2, 3], "token ids cannot be routed"),
                                            ([[1, 2]], "token ids cannot be routed"),
                                            (["a", "b"], "takes one prompt")])
def test_unroutable_prompts(client, model, prompt, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(model=model, prompt=prompt, max_tokens=4, extra_body={"atom_bank": "docs"})


def test_malformed_json_is_left_to_vllm(server):
    response = httpx.post(server["url"] + "/v1/chat/completions", content=b'{"atom_bank": "docs", ',
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert 400 <= response.status_code < 500 and "error" in response.json()


def test_unauthenticated_requests_do_no_work(server):
    before = metric(server["url"], "doc2atom_requests_total")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(server["url"] + "/v1/chat/completions", headers=headers, json={
            "model": "x", "messages": [{"role": "user", "content": "hi"}], "atom_bank": "no-such-bank"})
        assert response.status_code == 401  # not 404: the bank was never looked up
    assert metric(server["url"], "doc2atom_requests_total") == before


def test_concurrent_requests_on_different_banks(client, model):
    questions = list(IN_SCOPE)

    def one(i: int):
        bank = POOL[i % len(POOL)]
        try:
            return bank, ask(client, model, questions[i % len(questions)], bank=bank).parse()
        except openai.APIStatusError as exc:  # say what the server answered (a traceback alone does not)
            raise AssertionError(f"request {i} on bank {bank!r}: HTTP {exc.status_code} {exc.body}") from None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    for bank, reply in results:
        assert reply.model_extra["doc2atom"]["atom_bank"] == bank and reply.usage.completion_tokens > 0


def test_unused_adapters_are_evicted(client, model, server):
    for question in IN_SCOPE:
        ask(client, model, question, bank="team/b3")
    folders = [p for p in server["adapters"].glob("*/d2a-*")]
    assert 0 < len(folders) <= 2  # --doc2atom-adapter-cache 2, nothing in flight
    served = {m.id for m in client.models.list().data}
    assert served == {model}  # composed adapters are internal: not listed


def test_bank_changes_on_disk_are_picked_up(client, model, bank_root):
    question = "Which comet did astronomers at Brightwater discover?"
    before = ask(client, model, question, bank="mutable").parse().model_extra["doc2atom"]
    assert "brightwater_observatory" in {a["document_id"] for a in before["atoms"]}
    AtomBank.load(bank_root / "mutable").remove_documents(["brightwater_observatory"])
    after = ask(client, model, question, bank="mutable").parse().model_extra["doc2atom"]
    assert "brightwater_observatory" not in {a["document_id"] for a in after["atoms"]}


def test_metrics_are_exposed(server, client, model):
    ask(client, model, next(iter(IN_SCOPE)))
    text = httpx.get(server["url"] + "/metrics").text
    for name in ("doc2atom_requests_total", "doc2atom_compose_seconds_bucket", "doc2atom_route_seconds_bucket",
                 "doc2atom_adapter_cache_total", "doc2atom_atoms_per_request_bucket"):
        assert name in text
    assert "doc2atom bank=docs" in server["log"].read_text()  # one log line per routed request


def test_vllm_matches_transformers_peft_with_the_composed_adapter(client, model, server, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The harbor of Quillon was built by"
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                                      extra_body={"atom_bank": "docs", "return_tokens_as_token_ids": True})
    adapter = reply.model_extra["doc2atom"]["adapter"]
    folder = next(server["adapters"].glob(f"*/{adapter}"))
    generated = [int(t.split(":")[1]) for t in reply.choices[0].logprobs.tokens]
    vllm_logprobs = torch.tensor(reply.choices[0].logprobs.token_logprobs)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = tokenizer(prompt)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.tensor([prompt_ids + generated])
    answer = slice(len(prompt_ids) - 1, -1)
    with torch.no_grad():
        logprobs = torch.log_softmax(peft_model(ids).logits[0, answer], dim=-1)
        with peft_model.disable_adapter():
            base_logprobs = torch.log_softmax(peft_model(ids).logits[0, answer], dim=-1)
    assert logprobs.argmax(-1).tolist() == generated  # greedy tokens agree
    picked = torch.arange(len(generated)), torch.tensor(generated)
    assert (logprobs[picked] - vllm_logprobs).abs().max() < 1e-3
    assert (base_logprobs[picked] - vllm_logprobs).abs().max() > 1e-2  # and the adapter did matter


@contextmanager
def paused(pids: list[int]):
    """Stop processes (SIGSTOP) for the block: a stopped API server cannot accept, so the other one must."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def shared_server(tiny_model_dir, bank_root, tmp_path_factory):
    """Two API server processes sharing one engine; refusals fall back to the base model; small rank budget."""
    log = tmp_path_factory.mktemp("logs-shared") / "serve.log"
    with vllm_server(tiny_model_dir, bank_root, log, "--api-server-count", "2",
                     "--doc2atom-on-refusal", "base", "--max-lora-rank", "8", "--doc2atom-top-k", "12") as url:
        yield {"url": url, "log": log}


def test_two_api_servers_agree_on_adapter_identity(shared_server):
    client = openai.OpenAI(base_url=shared_server["url"] + "/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    question = "Who wrote the Velmora Orchard Protocol?"
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: ask(client, model, question).parse(), range(8)))
    assert len({r.model_extra["doc2atom"]["adapter"] for r in replies}) == 1

    refused = ask(client, model, OFF_TOPIC).parse()
    assert refused.model_extra["doc2atom"]["refused"]
    assert refused.choices[0].message.content != DEFAULT_REFUSAL  # the base model answered

    wide = ask(client, model, "Tell me about Brightwater Observatory and its telescope.", bank="wide")
    provenance = wide.parse().model_extra["doc2atom"]
    assert provenance["rank"] <= 8 and len(provenance["atoms"]) <= 2  # rank-4 atoms, --max-lora-rank 8
    assert provenance.get("dropped_for_rank")  # the broad question routed more atoms than fit


def test_banks_written_after_start_reach_every_api_server(shared_server, bank_root, tiny_model_dir, encoder):
    """One bank root on shared storage: a compile job writing a bank, then adding a document to it, is seen by
    every API server process without a restart."""
    from .untrained_bank import build_untrained_bank, default_spec, untrained_documents

    model = openai.OpenAI(base_url=shared_server["url"] + "/v1", api_key="none").models.list().data[0].id
    documents = {p.stem: p.read_text() for p in EXAMPLE_DOCS.glob("*.md")}
    late_doc = "brightwater_observatory"
    spec = default_spec(tiny_model_dir, encoder, modules=("q_proj", "v_proj", "down_proj"), last_layers=2)
    question = "Which comet did astronomers at Brightwater discover?"
    servers = dict(re.findall(r"\((ApiServer_\d+) pid=(\d+)\)", shared_server["log"].read_text()))
    assert len(servers) == 2, servers

    def documents_routed(atoms: int) -> list[set[str]]:
        """Ask each API server process in turn; the kernel hands the connection to the only one not paused."""
        routed = []
        for name, pid in servers.items():
            with paused([int(other) for other in servers.values() if other != pid]):
                client = openai.OpenAI(base_url=shared_server["url"] + "/v1", api_key="none", max_retries=0,
                                       timeout=60)  # a fresh connection pool: no connection to a paused process
                reply = ask(client, model, question, bank="late")
                client.close()
            routed.append({a["document_id"] for a in reply.parse().model_extra["doc2atom"]["atoms"]})
            pattern = rf"\({name} pid={pid}\).*loaded bank late \({atoms} atoms\)"
            assert re.search(pattern, shared_server["log"].read_text()), f"{name} did not load the bank of {atoms}"
        return routed

    try:
        build_untrained_bank(bank_root / "late", spec, {k: v for k, v in documents.items() if k != late_doc},
                             encoder, seed=7, scale=0.3)
        before = len(AtomBank.load(bank_root / "late"))
        assert all(late_doc not in routed for routed in documents_routed(before))
        added = untrained_documents(spec, {late_doc: documents[late_doc]}, encoder, seed=8, scale=0.3)
        after = len(AtomBank.load(bank_root / "late").add_documents(added))
        assert all(late_doc in routed for routed in documents_routed(after))
    finally:
        shutil.rmtree(bank_root / "late", ignore_errors=True)
