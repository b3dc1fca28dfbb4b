"""The trainer's frozen inputs, computed once from a built dataset: atom features, sentence embeddings and
student states (or read back from the run folder's cache, `prepared.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from vllm_doc2atom.bank_interface import ATOM_TYPES

from ..data.build import read_jsonl
from ..data.records import ANSWERABLE
from ..data.teacher import load_teacher_targets
from .atom_inputs import AtomInputs, atom_features
from .config import TrainConfig
from .prepared import AtomTable, QuestionItem, cache_key, load_prepared, save_prepared
from .student_inputs import encode_students, student_prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vllm_doc2atom.encoders import SentenceTransformerEncoder


def prepare(config: TrainConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
            encoder: SentenceTransformerEncoder) -> tuple[AtomTable, list[QuestionItem]]:
    """Load a built dataset and compute every frozen input once (features, embeddings, student states)."""
    data = Path(config.data)
    documents = {d["id"]: d for d in read_jsonl(data / "documents.jsonl")}
    atoms = list(read_jsonl(data / "atoms.jsonl"))
    questions = [q for q in read_jsonl(data / "questions.jsonl") if q["split"] in ("train", "validation")]
    if config.max_train_questions:
        questions = questions[: config.max_train_questions]
    used_docs = {q["document_id"] for q in questions}
    atoms = [a for a in atoms if a["document_id"] in used_docs]
    first_seen = {d: i for i, d in enumerate(dict.fromkeys(a["document_id"] for a in atoms))}
    # each document's atoms on consecutive rows, in order
    atoms.sort(key=lambda a: first_seen[a["document_id"]])
    targets = load_teacher_targets(data / "teacher")

    ids = [a["id"] for a in atoms]
    row = {atom_id: i for i, atom_id in enumerate(ids)}
    document_rows: dict[str, list[int]] = {}
    for i, a in enumerate(atoms):
        document_rows.setdefault(a["document_id"], []).append(i)
    features = AtomInputs.cat([
        atom_features(model, tokenizer, documents[doc_id]["text"], [tuple(atoms[r]["span"]) for r in rows],
                      config.encoder_layer)
        for doc_id, rows in tqdm(document_rows.items(), desc="atom features", unit="doc")])
    group_names = sorted({a["conflict_group"] for a in atoms if a.get("conflict_group")})
    table = AtomTable(
        ids=ids, document_rows=document_rows, features=features,
        text_embeddings=torch.from_numpy(encoder.encode([a.get("retrieval_text") or a["text"] for a in atoms])),
        confidence=torch.tensor([float(a["confidence"]) for a in atoms]),
        groups=torch.tensor([group_names.index(a["conflict_group"]) if a.get("conflict_group") else -1
                             for a in atoms]),
        types=torch.tensor([ATOM_TYPES.index(a["type"]) for a in atoms], dtype=torch.long),
        answer_bearing=torch.tensor([float(a["answer_bearing"]) for a in atoms]))

    start_layer = model.config.num_hidden_layers - config.adapted_layers
    answerable = [q for q in questions
                  if q["kind"] == ANSWERABLE and q["id"] in targets and q["labels"]["gold"]]
    students = {s.question_id: s for s in encode_students(
        model, tokenizer, [(q["id"], q["question"], q["answers"]) for q in answerable], targets, start_layer)}
    embeddings = torch.from_numpy(encoder.encode([q["question"] for q in questions]))
    items = []
    for q, embedding in zip(questions, embeddings):
        if q["kind"] == ANSWERABLE and q["id"] not in students:
            continue  # no teacher target or no gold atom: nothing to distil
        prompt_hidden = None
        if q["kind"] != ANSWERABLE:
            with torch.no_grad():
                ids_ = torch.tensor([student_prompt_ids(tokenizer, q["question"])])
                prompt_hidden = model(input_ids=ids_, output_hidden_states=True).hidden_states[start_layer][0]
        labels = q["labels"]
        items.append(QuestionItem(
            id=q["id"], document_id=q["document_id"], kind=q["kind"], split=q["split"],
            positives=[row[a] for a in labels["gold"] + labels["supporting"] if a in row],
            gold=[row[a] for a in labels["gold"] if a in row], embedding=embedding,
            student=students.get(q["id"]), prompt_hidden=prompt_hidden))
    return table, items


def prepared_inputs(config: TrainConfig, model_dir: str, model: torch.nn.Module,
                    tokenizer: PreTrainedTokenizerBase, encoder: SentenceTransformerEncoder,
                    write: bool) -> tuple[AtomTable, list[QuestionItem]]:
    """`prepare`'s result, from the run folder's cache when the data, model and settings are unchanged."""
    if not config.cache_prepared:
        return prepare(config, model, tokenizer, encoder)
    folder, key = Path(config.out) / "prepared", cache_key(config, model_dir, encoder.identity)
    cached = load_prepared(folder, key)
    if cached is not None:
        return cached
    table, items = prepare(config, model, tokenizer, encoder)
    if write and items:
        save_prepared(folder, key, table, items)
    return table, items
