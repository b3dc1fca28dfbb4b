"""`doc2atom data build`: one source -> atoms, probes, labels, splits and (optionally) teacher targets.

    OUT/manifest.json      settings, counts per split / kind / atom type, timings
    OUT/documents.jsonl    {id, title, source, split, text}
    OUT/atoms.jsonl        AtomRecord per line
    OUT/questions.jsonl    Question + {split, labels: {gold, supporting, distractors}}
    OUT/teacher/           teacher targets (see teacher.py)
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_doc2atom.bank_interface import AtomRecord
from vllm_doc2atom.files import atomic_file, atomic_write_text

from ..atomize.rules import RuleAtomizer
from ..device import DeviceConfig
from ..inputs import InputError, model_folder, output_folder, require_file
from .cross_document_probes import off_topic_probes
from .labels import label_question
from .records import Corpus
from .splits import split_of

logger = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    source: str  # a loader name (squad2, hotpotqa, squad1, drop, qasper_yesno, synthetic) or a .json/.jsonl file
    out: Path
    limit: int | None = None  # at most this many documents
    synthetic_documents: int = 200  # corpus size when source is "synthetic"
    atomizer: str = "rules"  # "rules", "llm", or "chunks" (fixed-size raw windows: the d2l_raw baseline)
    llm_base_url: str = "http://127.0.0.1:8000/v1"
    llm_model: str = ""
    llm_api_key: str = "none"
    probes_per_document: int = 1  # off-topic questions per document
    teacher_model: str | None = None  # base model folder; None skips teacher targets
    teacher_backend: str = "auto"
    teacher_device: str = "auto"  # transformers teacher's --device / --dtype (training.device): vLLM places
    teacher_dtype: str = "auto"  # itself
    top_k: int = 16
    seed: int = 0


def check_source(source: str) -> None:
    """A loader name or an existing .json/.jsonl file; else InputError listing every valid source."""
    from .sources import SOURCES

    if source in SOURCES or source == "synthetic":
        return
    if Path(source).suffix in (".json", ".jsonl"):
        require_file(source, "source file")
        return
    raise InputError(f"unknown source {source!r}: use one of {', '.join(sorted([*SOURCES, 'synthetic']))}, "
                     "or a SQuAD .json / .jsonl file")


def load_corpus(config: BuildConfig) -> Corpus:
    check_source(config.source)
    if config.source == "synthetic":
        from .synthetic import synthetic_corpus

        return synthetic_corpus(config.limit or config.synthetic_documents, seed=config.seed)
    from .sources import load_source

    return load_source(config.source, limit=config.limit)


def atomize(corpus: Corpus, config: BuildConfig) -> dict[str, list[AtomRecord]]:
    rules = RuleAtomizer()
    texts = {doc_id: doc.text for doc_id, doc in corpus.documents.items()}
    if config.atomizer == "llm":
        from ..atomize.llm import LLMAtomizer, LLMAtomizerConfig

        llm = LLMAtomizer(LLMAtomizerConfig(base_url=config.llm_base_url, model=config.llm_model,
                                            api_key=config.llm_api_key, cache_dir=config.out / "llm-cache"),
                          fallback=rules)
        return llm.atomize(texts)
    if config.atomizer == "chunks":
        from ..atomize.chunks import ChunkAtomizer

        rules = ChunkAtomizer()
    elif config.atomizer != "rules":
        raise ValueError(f"unknown atomizer {config.atomizer!r} (rules, llm or chunks)")
    return {doc_id: rules(doc_id, text) for doc_id, text in tqdm(texts.items(), desc="atomize", unit="doc")}


def build_dataset(config: BuildConfig) -> dict[str, Any]:
    """Build everything under config.out and return the manifest. Bad inputs (source, teacher model, `out` a
    file) raise InputError before anything is written."""
    output_folder(config.out)
    if config.teacher_model:
        model_folder(config.teacher_model)
        DeviceConfig.from_flags(config.teacher_device, config.teacher_dtype)
    start = time.perf_counter()
    corpus = load_corpus(config)
    loaded = time.perf_counter()
    atoms = atomize(corpus, config)
    atomized = time.perf_counter()
    questions = corpus.questions + off_topic_probes(corpus, config.probes_per_document, config.seed)
    splits = {doc_id: doc.split or split_of(doc_id) for doc_id, doc in corpus.documents.items()}

    config.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(config.out / "documents.jsonl",
                 ({**asdict(doc), "split": splits[doc.id]} for doc in corpus.documents.values()))
    write_jsonl(config.out / "atoms.jsonl", (a.to_dict() for doc_atoms in atoms.values() for a in doc_atoms))
    write_jsonl(config.out / "questions.jsonl", (
        {**q.to_dict(), "split": splits[q.document_id],
         "labels": label_question(q, atoms[q.document_id], corpus.documents[q.document_id].text).to_dict()}
        for q in questions))

    teacher = None
    if config.teacher_model:
        from .teacher import TeacherConfig, build_teacher_targets

        teacher_config = TeacherConfig(model=config.teacher_model, top_k=config.top_k,
                                       backend=config.teacher_backend, device=config.teacher_device,
                                       dtype=config.teacher_dtype)
        teacher = build_teacher_targets(questions, corpus.documents, config.out / "teacher", teacher_config)
    all_atoms = [a for doc_atoms in atoms.values() for a in doc_atoms]
    manifest = {
        "format": "doc2atom-dataset", "format_version": 1,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "counts": {
            "documents": len(corpus.documents),
            "documents_per_split": dict(Counter(splits.values())),
            "atoms": len(all_atoms),
            "atoms_per_type": dict(Counter(a.type for a in all_atoms)),
            "questions_per_kind": dict(Counter(q.kind for q in questions)),
            "questions_per_split": dict(Counter(splits[q.document_id] for q in questions)),
            "answerable_with_gold_atoms": sum(1 for line in read_jsonl(config.out / "questions.jsonl")
                                              if line["labels"]["gold"]),
        },
        "seconds": {"load": round(loaded - start, 2), "atomize": round(atomized - loaded, 2),
                    "total": round(time.perf_counter() - start, 2)},
        "atoms_per_second": round(len(all_atoms) / max(atomized - loaded, 1e-9), 1),
        "teacher": teacher,
    }
    atomic_write_text(config.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_jsonl(path: Path, rows) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file, one by one."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
