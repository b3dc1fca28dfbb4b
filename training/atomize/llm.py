"""LLM atomizer: ask any OpenAI-compatible endpoint to cut a document into typed atoms, returned as XML.

Every atom's `<source>` quote is located in the document (whitespace-insensitively, via `spans.repair_span`);
atoms whose quote is not verbatim are dropped. Replies are cached on disk per (document text, prompt, model),
and a document whose every attempt fails goes to the rule-based fallback.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from openai import AsyncOpenAI
from tqdm.auto import tqdm

from vllm_doc2atom.bank_interface import ATOM_TYPES, AtomRecord
from vllm_doc2atom.files import atomic_write_text

from .spans import repair_span

logger = logging.getLogger(__name__)

PROMPT_VERSION = "llm-atoms-v1"

SYSTEM_PROMPT = """You cut documents into knowledge atoms: small, self-contained statements, each backed by a \
verbatim quote from the document. Atom types:
- fact_claim: a standalone factual claim ("X was founded in 1998").
- entity_attribute: a property of one named entity ("X's headquarters are in Oslo").
- event_relation: how events or entities relate: cause, order, participation ("A acquired B after the merger").
- process_step: one step of a procedure, with its order or condition ("Step 2: heat the mixture to 80 C").
- evidence_fragment: a number, quote or observation that supports some claim ("the survey had 1,204 replies").

Rules:
- <text> is one statement that makes sense alone: resolve pronouns and vague references to full names.
- <source> is copied character for character from the document (the shortest passage that supports the atom).
- answer_bearing="true" when the atom directly answers a plausible question about the document.
- abstraction: 0 = verbatim detail, 1 = light summary, 2 = high-level takeaway.
- confidence: how sure the document is of the statement, 0.0 to 1.0 (hedged or disputed claims get less).
- conflict_group: give atoms that contradict each other the same short label; omit it otherwise.
- Cover every fact of the document once. Reply with the XML only, no commentary.

Example document:
Acme Corp was founded in 1998 by Jane Doe. It moved to Oslo in 2005.

Example reply:
<atoms>
<atom type="fact_claim" answer_bearing="true" abstraction="0" confidence="1.0"><text>Acme Corp was founded in \
1998 by Jane Doe.</text><source>Acme Corp was founded in 1998 by Jane Doe.</source></atom>
<atom type="event_relation" answer_bearing="true" abstraction="0" confidence="1.0"><text>Acme Corp moved to Oslo \
in 2005.</text><source>It moved to Oslo in 2005.</source></atom>
</atoms>"""

USER_PROMPT = """Cut this document into atoms. Reply with <atoms><atom type="..." answer_bearing="true|false" \
abstraction="0|1|2" confidence="0.0-1.0" conflict_group="optional"><text>...</text><source>...</source></atom>...\
</atoms>.

Document:
{document}"""


@dataclass
class LLMAtomizerConfig:
    base_url: str  # OpenAI-compatible endpoint, e.g. "http://localhost:8000/v1"
    model: str  # model name sent with each request (also part of the cache key)
    api_key: str = "none"  # bearer token; local servers usually ignore it
    temperature: float = 0.0  # sampling temperature (0 = greedy, reproducible)
    max_tokens: int = 2048  # reply length cap per document
    max_retries: int = 3  # extra attempts after the first (API errors, timeouts, replies with no valid atom)
    backoff_seconds: float = 1.0  # wait before retry k is backoff_seconds * 2**k
    concurrency: int = 4  # documents in flight at once
    timeout_s: float = 120.0  # per-request timeout
    cache_dir: Path | None = None  # raw replies cached here, one JSON file per document; None = no cache


# ---------------------------------------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"```[a-zA-Z]*")
_FIELD = re.compile(r"(<(text|source)\b[^>]*>)((?:(?!</?(?:text|source|atoms?)\b).)*?)(</\2\s*>)", re.DOTALL)
_BARE_AMP = re.compile(r"&(?!(?:amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);)")
_ATOM_BLOCK = re.compile(r"<atom\b([^>]*)>((?:(?!<atom\b).)*?)</atom\s*>", re.DOTALL)
_ATTR = re.compile(r"""([\w-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_TRUE = {"true", "1", "yes", "y"}


def _escape_field(match: re.Match[str]) -> str:
    body = html.unescape(match.group(3)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return match.group(1) + body + match.group(4)


def _clean(xml: str) -> str | None:
    """The atoms of a reply as one well-formed-ish <atoms> document, or None when there is no complete atom."""
    xml = _FENCE.sub("", xml)
    start, end = re.search(r"<atom\b", xml), xml.rfind("</atom>")
    if start is None or end < start.start():
        return None
    body = _FIELD.sub(_escape_field, xml[start.start():end + len("</atom>")])
    return "<atoms>" + _BARE_AMP.sub("&amp;", body) + "</atoms>"


def _normalize(attrs: Mapping[str, str], text: str, source: str) -> dict[str, Any] | None:
    text = " ".join(text.split())
    if not text:
        return None
    kind = attrs.get("type", "").strip().lower()
    try:
        abstraction = max(0, int(float(attrs.get("abstraction", attrs.get("abstraction_level", "0")))))
    except ValueError:
        abstraction = 0
    try:
        confidence = float(attrs.get("confidence", "1.0"))
        confidence = 1.0 if confidence != confidence else min(1.0, max(0.0, confidence))  # NaN -> default
    except ValueError:
        confidence = 1.0
    return {
        "type": kind if kind in ATOM_TYPES else "fact_claim",
        "text": text,
        "source": source.strip(),
        "answer_bearing": attrs.get("answer_bearing", "").strip().lower() in _TRUE,
        "abstraction_level": abstraction,
        "confidence": confidence,
        "conflict_group": attrs.get("conflict_group", "").strip() or None,
    }


def _parse_etree(cleaned: str) -> list[dict[str, Any]]:
    atoms = []
    for el in ET.fromstring(cleaned).iter("atom"):
        text, source = el.find("text"), el.find("source")
        atom = _normalize(el.attrib, "".join(text.itertext()) if text is not None else "",
                          "".join(source.itertext()) if source is not None else "")
        if atom:
            atoms.append(atom)
    return atoms


def _parse_regex(xml: str) -> list[dict[str, Any]]:
    atoms = []
    for block in _ATOM_BLOCK.finditer(_FENCE.sub("", xml)):
        attrs = {k: html.unescape(a if a else b) for k, a, b in _ATTR.findall(block.group(1))}
        fields = {}
        for name in ("text", "source"):
            m = re.search(rf"<{name}\b[^>]*>(.*?)(?=</{name}\s*>|<(?:text|source)\b|$)", block.group(2), re.DOTALL)
            fields[name] = html.unescape(m.group(1)) if m else ""
        atom = _normalize(attrs, fields["text"], fields["source"])
        if atom:
            atoms.append(atom)
    return atoms


def parse_atoms_xml(xml: str) -> list[dict[str, Any]]:
    """Atoms of an LLM reply as dicts (type, text, source, answer_bearing, abstraction_level, confidence,
    conflict_group). Tolerates prose and code fences around the XML, unescaped `&`/`<` in text, a missing
    `</atoms>` and a truncated last atom (dropped). Never raises: garbage gives []."""
    try:
        cleaned = _clean(xml or "")
        if cleaned is None:
            return []
        try:
            return _parse_etree(cleaned)
        except ET.ParseError:
            return _parse_regex(xml)
    except Exception:  # a reply must never crash the pipeline
        logger.debug("unparseable atom reply", exc_info=True)
        return []


# --------------------------------------------------------------------------------------------------------- atomizer

def cache_key(text: str, model: str) -> str:
    """sha256 of (document text, PROMPT_VERSION, model)."""
    return hashlib.sha256(json.dumps([text, PROMPT_VERSION, model]).encode()).hexdigest()


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False))


class LLMAtomizer:
    """Documents -> atoms through an OpenAI-compatible chat endpoint, with cache, retries and a fallback."""

    def __init__(self, config: LLMAtomizerConfig, fallback: Callable[[str, str], list[AtomRecord]]) -> None:
        self.config = config
        self.fallback = fallback
        self.fallbacks: list[str] = []  # ids of the documents of the last run that went to the fallback

    def atomize(self, documents: Mapping[str, str]) -> dict[str, list[AtomRecord]]:
        """Atoms per document id, in input order. Runs its own event loop: inside one, await atomize_async."""
        return asyncio.run(self.atomize_async(documents))

    async def atomize_async(self, documents: Mapping[str, str]) -> dict[str, list[AtomRecord]]:
        self.fallbacks = []
        cfg = self.config
        semaphore = asyncio.Semaphore(max(1, cfg.concurrency))
        async with AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key, timeout=cfg.timeout_s,
                               max_retries=0) as client:
            with tqdm(total=len(documents), desc="atomize (llm)", unit="doc") as bar:

                async def one(doc_id: str, text: str) -> list[AtomRecord]:
                    async with semaphore:
                        atoms = await self._document(client, doc_id, text)
                    bar.update(1)
                    return atoms

                results = await asyncio.gather(*(one(d, t) for d, t in documents.items()))
        return dict(zip(documents, results))

    def records(self, document_id: str, text: str, parsed: list[dict[str, Any]]) -> list[AtomRecord]:
        """AtomRecords of parsed atoms whose source quote is found in `text`; the others are dropped."""
        atoms: list[AtomRecord] = []
        dropped = repaired = cursor = 0
        for item in parsed:
            quote = item["source"] or item["text"]
            exact = text.find(quote, cursor) if quote.strip() else -1
            exact = text.find(quote) if exact < 0 and quote.strip() else exact
            claimed = (exact, exact + len(quote)) if exact >= 0 else (cursor, cursor)
            span = repair_span(text, quote, claimed) if quote.strip() else None
            if span is None:
                dropped += 1
                continue
            repaired += span != claimed
            cursor = span[0]
            group = item["conflict_group"]
            atoms.append(AtomRecord(
                id=f"{document_id}#{len(atoms)}", document_id=document_id, type=item["type"], text=item["text"],
                span=span, answer_bearing=item["answer_bearing"], abstraction_level=item["abstraction_level"],
                # labels are per reply: scope them to the document so that "g1" of two documents never collide
                conflict_group=f"{document_id}/{group}" if group else None,
                confidence=item["confidence"], retrieval_text=item["text"]))
        if dropped or repaired:
            logger.info("%s: %d atoms kept, %d spans repaired, %d dropped (quote not in document)",
                        document_id, len(atoms), repaired, dropped)
        return atoms

    async def _document(self, client: AsyncOpenAI, doc_id: str, text: str) -> list[AtomRecord]:
        if not text.strip():
            return []
        cfg = self.config
        path = cfg.cache_dir / f"{cache_key(text, cfg.model)}.json" if cfg.cache_dir else None
        if path is not None and path.is_file():
            try:
                atoms = self.records(doc_id, text, parse_atoms_xml(json.loads(path.read_text("utf-8"))["reply"]))
                if atoms:
                    return atoms
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("%s: unreadable cache file %s, asking again", doc_id, path)
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(cfg.backoff_seconds * 2 ** (attempt - 1))
            try:
                reply = await self._ask(client, text)
            except (openai.APIError, TimeoutError) as exc:
                logger.info("%s: attempt %d/%d failed: %s", doc_id, attempt + 1, cfg.max_retries + 1, exc)
                continue
            atoms = self.records(doc_id, text, parse_atoms_xml(reply))
            if atoms:
                if path is not None:
                    _write_atomic(path, {"key": path.stem, "document_id": doc_id, "model": cfg.model,
                                         "prompt_version": PROMPT_VERSION, "reply": reply})
                return atoms
            logger.info("%s: attempt %d/%d gave no valid atom", doc_id, attempt + 1, cfg.max_retries + 1)
        logger.warning("%s: LLM atomizer failed after %d attempts, using the fallback atomizer",
                       doc_id, cfg.max_retries + 1)
        self.fallbacks.append(doc_id)
        return self.fallback(doc_id, text)

    async def _ask(self, client: AsyncOpenAI, text: str) -> str:
        cfg = self.config
        response = await client.chat.completions.create(
            model=cfg.model, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
            messages=[{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": USER_PROMPT.format(document=text)}])
        return (response.choices[0].message.content or "") if response.choices else ""
