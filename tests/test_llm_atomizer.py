"""The LLM atomizer: XML parsing, span checks, and the protocol against a real local OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training.atomize.llm import LLMAtomizer, LLMAtomizerConfig, parse_atoms_xml
from vllm_doc2atom.bank_interface import AtomRecord

DOC = "The Eiffel Tower is 330 metres tall.\nIt was completed in 1889 for the World's Fair."

REPLY = """Here are the atoms:
```xml
<atoms>
<atom type="entity_attribute" answer_bearing="true" abstraction="0" confidence="0.9">
  <text>The Eiffel Tower is 330 metres tall.</text>
  <source>The Eiffel Tower is 330 metres tall.</source>
</atom>
<atom type="fact_claim" answer_bearing="true" abstraction="1" confidence="1.0">
  <text>The Eiffel Tower was completed in 1889.</text>
  <source>It was completed in 1889</source>
</atom>
</atoms>
```
Hope this helps."""


def atom_xml(text: str, source: str, **attrs: str) -> str:
    head = " ".join(f'{k}="{v}"' for k, v in {"type": "fact_claim", **attrs}.items())
    return f"<atom {head}><text>{text}</text><source>{source}</source></atom>"


# ------------------------------------------------------------------------------------------------------------ parsing

def test_parse_clean_xml():
    xml = "<atoms>" + atom_xml("A is B.", "A is B", type="entity_attribute", answer_bearing="true",
                               abstraction="2", confidence="0.25", conflict_group="ab") + "</atoms>"
    assert parse_atoms_xml(xml) == [{"type": "entity_attribute", "text": "A is B.", "source": "A is B",
                                     "answer_bearing": True, "abstraction_level": 2, "confidence": 0.25,
                                     "conflict_group": "ab"}]


def test_parse_fenced_with_prose_around():
    atoms = parse_atoms_xml(REPLY)
    assert [a["source"] for a in atoms] == ["The Eiffel Tower is 330 metres tall.", "It was completed in 1889"]
    assert [a["type"] for a in atoms] == ["entity_attribute", "fact_claim"]
    assert atoms[0]["confidence"] == 0.9 and atoms[1]["abstraction_level"] == 1


def test_parse_unescaped_ampersand_and_angle_bracket():
    xml = "<atoms>" + atom_xml("AT&T says x < y & y > z.", "x < y &amp; z") + atom_xml("Q&A", "Q & A") + "</atoms>"
    atoms = parse_atoms_xml(xml)
    assert [(a["text"], a["source"]) for a in atoms] == [("AT&T says x < y & y > z.", "x < y & z"), ("Q&A", "Q & A")]


def test_parse_missing_closing_root_and_truncated_last_atom():
    assert len(parse_atoms_xml("<atoms>" + atom_xml("One.", "one") + atom_xml("Two.", "two"))) == 2
    truncated = "<atoms>" + atom_xml("One.", "one") + '<atom type="fact_claim"><text>Two is cut'
    assert [a["text"] for a in parse_atoms_xml(truncated)] == ["One."]


def test_parse_unknown_and_missing_attributes_get_defaults():
    xml = ('<atoms><atom type="opinion" confidence="7" abstraction="high"><text>X.</text><source>X</source></atom>'
           "<atom><text>Y.</text><source>Y</source></atom>"
           '<atom confidence="-1" answer_bearing="yes"><text>Z.</text></atom></atoms>')
    x, y, z = parse_atoms_xml(xml)
    assert x == {"type": "fact_claim", "text": "X.", "source": "X", "answer_bearing": False, "abstraction_level": 0,
                 "confidence": 1.0, "conflict_group": None}
    assert y["type"] == "fact_claim" and y["confidence"] == 1.0 and y["answer_bearing"] is False
    assert z["confidence"] == 0.0 and z["answer_bearing"] is True and z["source"] == ""


def test_parse_regex_fallback_on_broken_structure():
    # an unclosed <text> defeats ElementTree; the regex pass still recovers both atoms
    xml = '<atoms><atom type="process_step"><text>Mix.<source>Mix</source></atom>' + atom_xml("Bake.", "Bake")
    assert [(a["type"], a["text"], a["source"]) for a in parse_atoms_xml(xml)] == [
        ("process_step", "Mix.", "Mix"), ("fact_claim", "Bake.", "Bake")]


@pytest.mark.parametrize("garbage", ["", "no xml here", "<atoms></atoms>", "<atom", "</atom><atom>", "<<<&&&>>>",
                                     '<atoms><atom type="x"><text></text></atom></atoms>', "```xml\n```"])
def test_parse_garbage_gives_nothing(garbage):
    assert parse_atoms_xml(garbage) == []


# -------------------------------------------------------------------------------------------------------------- spans

def test_spans_verbatim_repaired_and_dropped(caplog):
    atomizer = LLMAtomizer(LLMAtomizerConfig(base_url="http://unused", model="m"), fallback=lambda d, t: [])
    parsed = parse_atoms_xml("<atoms>" + atom_xml("Height.", "330 metres tall")
                             + atom_xml("Completion.", "It   was completed\nin  1889")
                             + atom_xml("Invented.", "It was built in 1999") + "</atoms>")
    with caplog.at_level("INFO", logger="training.atomize.llm"):
        atoms = atomizer.records("eiffel", DOC, parsed)
    assert [a.id for a in atoms] == ["eiffel#0", "eiffel#1"]
    assert DOC[slice(*atoms[0].span)] == "330 metres tall"
    assert DOC[slice(*atoms[1].span)] == "It was completed in 1889"
    assert all(a.retrieval_text == a.text and a.document_id == "eiffel" for a in atoms)
    assert "1 spans repaired, 1 dropped" in caplog.text


# ------------------------------------------------------------------------------------------------- protocol (server)

class FakeLLM:
    """A real HTTP server on 127.0.0.1 speaking /v1/chat/completions; `respond(document, n)` -> (status, content)."""

    def __init__(self, respond: Callable[[str, int], tuple[int, str]], delay: float = 0.0) -> None:
        self.respond, self.delay = respond, delay
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    n = len(fake.requests)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay)
                    document = body["messages"][-1]["content"].split("Document:\n", 1)[-1]
                    status, content = fake.respond(document, n) if self.path == "/v1/chat/completions" else (404, "")
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                payload = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                if status != 200:
                    payload = {"error": {"message": "boom", "type": "server_error", "code": status}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeLLM:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def fallback(document_id: str, text: str) -> list[AtomRecord]:
    return [AtomRecord(id=f"{document_id}#0", document_id=document_id, type="evidence_fragment", text=text,
                       span=(0, len(text)), confidence=0.5)]


def config(url: str, **overrides) -> LLMAtomizerConfig:
    return LLMAtomizerConfig(**{"base_url": url, "model": "fake-model", "backoff_seconds": 0.01, "timeout_s": 10,
                                "max_retries": 3, **overrides})


@pytest.fixture
def ok_server() -> Iterator[FakeLLM]:
    with FakeLLM(lambda document, n: (200, REPLY)) as server:
        yield server


def test_protocol_atoms_come_back_with_spans(ok_server):
    result = LLMAtomizer(config(ok_server.url), fallback).atomize({"eiffel": DOC})
    atoms = result["eiffel"]
    assert [(a.id, a.type, DOC[slice(*a.span)]) for a in atoms] == [
        ("eiffel#0", "entity_attribute", "The Eiffel Tower is 330 metres tall."),
        ("eiffel#1", "fact_claim", "It was completed in 1889")]
    assert atoms[0].answer_bearing and atoms[0].confidence == 0.9 and atoms[1].abstraction_level == 1
    (request,) = ok_server.requests
    assert request["model"] == "fake-model" and request["temperature"] == 0.0 and request["max_tokens"] == 2048
    assert request["messages"][0]["role"] == "system" and DOC in request["messages"][1]["content"]


def test_protocol_cache_makes_second_run_free(ok_server, tmp_path):
    docs = {"eiffel": DOC, "other": DOC + " Again."}
    first = LLMAtomizer(config(ok_server.url, cache_dir=tmp_path / "cache"), fallback).atomize(docs)
    assert len(ok_server.requests) == 2
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 2 and all(json.loads(f.read_text())["reply"] == REPLY for f in files)
    second = LLMAtomizer(config(ok_server.url, cache_dir=tmp_path / "cache"), fallback).atomize(docs)
    assert len(ok_server.requests) == 2  # zero new requests
    assert second == first
    LLMAtomizer(config(ok_server.url, cache_dir=tmp_path / "cache", model="other-model"), fallback).atomize(docs)
    assert len(ok_server.requests) == 4  # the model is part of the key


def test_protocol_retries_server_errors_and_empty_replies():
    with FakeLLM(lambda document, n: (500, "") if n <= 2 else (200, REPLY)) as server:
        atomizer = LLMAtomizer(config(server.url), fallback)
        assert len(atomizer.atomize({"eiffel": DOC})["eiffel"]) == 2
    assert len(server.requests) == 3 and atomizer.fallbacks == []
    with FakeLLM(lambda document, n: (200, "Sorry, I cannot help.") if n == 1 else (200, REPLY)) as server:
        assert len(LLMAtomizer(config(server.url), fallback).atomize({"eiffel": DOC})["eiffel"]) == 2
    assert len(server.requests) == 2


def test_protocol_always_failing_server_falls_back(caplog):
    with FakeLLM(lambda document, n: (200, REPLY) if "1889" in document else (500, "")) as server:
        atomizer = LLMAtomizer(config(server.url, max_retries=2), fallback)
        with caplog.at_level("WARNING", logger="training.atomize.llm"):
            result = atomizer.atomize({"bad": "Some other text.", "eiffel": DOC})
    assert list(result) == ["bad", "eiffel"]
    assert atomizer.fallbacks == ["bad"]
    assert result["bad"] == fallback("bad", "Some other text.")
    assert len(result["eiffel"]) == 2
    assert len(server.requests) == 3 + 1
    assert "bad" in caplog.text and "fallback" in caplog.text


def test_protocol_concurrency_limit():
    with FakeLLM(lambda document, n: (200, REPLY), delay=0.1) as server:
        docs = {f"d{i}": DOC for i in range(8)}
        result = LLMAtomizer(config(server.url, concurrency=2), fallback).atomize(docs)
    assert list(result) == list(docs) and all(len(atoms) == 2 for atoms in result.values())
    assert len(server.requests) == 8
    assert server.max_in_flight == 2
