"""`doc2atom compile`: documents -> atoms -> a trained compiler's micro-LoRAs, gates and keys -> an atom bank.

Amortized: one compiler forward per atom (the paper's mode). The bank carries the trained query projection
and router head, so a server routes it exactly as it was trained.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_doc2atom.bank import AtomBank, BankSpec, DocumentAtoms
from vllm_doc2atom.fingerprint import BaseModelFingerprint

from .atomize.rules import RuleAtomizer
from .student import atom_features
from .trainer import load_compiler

logger = logging.getLogger(__name__)


def read_documents(paths: list[str | Path]) -> dict[str, str]:
    """.txt / .md files (id = file stem) and .jsonl files of {"id", "text"} (or {"document_id", "document"})."""
    documents: dict[str, str] = {}
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    doc_id = record.get("id") or record.get("document_id") or f"{path.stem}-{n}"
                    documents[str(doc_id)] = record.get("text") or record["document"]
        else:
            documents[path.stem] = path.read_text(encoding="utf-8")
    return documents


@torch.no_grad()
def compile_documents(documents: Mapping[str, str], checkpoint: str | Path, out: str | Path,
                      model_dir: str | Path | None = None, overwrite: bool = False) -> tuple[AtomBank, dict]:
    """Compile documents into a bank at `out`; returns the bank and timing stats."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_doc2atom.encoders import SentenceTransformerEncoder

    from .models import PACKAGED_MODELS, prepare_model

    start = time.perf_counter()
    compiler, meta = load_compiler(checkpoint)
    model_name = str(model_dir or meta["train"]["model"])
    model_dir = prepare_model(model_name) if model_name in PACKAGED_MODELS else Path(model_name)
    base = BaseModelFingerprint.from_model_dir(model_dir)
    diffs = compiler.config.fingerprint().differences(base)
    if diffs:
        raise ValueError(f"checkpoint {checkpoint} was trained for another base model: {'; '.join(diffs)}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    projection = compiler.query_proj.detach().numpy()
    sentences = SentenceTransformerEncoder()  # atom texts: raw embeddings, the compiler's key projection follows
    encoder = sentences.with_projection(projection)  # questions, as the server will encode them
    config = compiler.config
    spec = BankSpec(base_model=base, targets=config.target_list(), micro_rank=config.micro_rank,
                    lora_scaling=config.lora_scaling, key_encoder=encoder.identity, key_dim=config.key_dim,
                    checkpoint=f"{Path(checkpoint).resolve().parent.name}@step{meta['step']}",
                    router_head=asdict(compiler.head.export()))
    atomizer = RuleAtomizer()
    compiled, atom_count = [], 0
    for doc_id, text in tqdm(documents.items(), desc="compile", unit="doc"):
        atoms = atomizer(doc_id, text)
        if not atoms:
            logger.warning("%s: no atoms (empty document?), skipped", doc_id)
            continue
        features = atom_features(model, tokenizer, text, [a.span for a in atoms], meta["encoder_layer"])
        a, b, gates = compiler(features)
        embeddings = torch.from_numpy(sentences.encode([x.retrieval_text or x.text for x in atoms]))
        tensors = {f"A.{t.key}": a[t] for t in config.target_list()}
        tensors |= {f"B.{t.key}": b[t] for t in config.target_list()}
        tensors |= {"gates": gates, "keys": compiler.keys(embeddings)}
        compiled.append(DocumentAtoms(doc_id, atoms, tensors))
        atom_count += len(atoms)
    bank = AtomBank.create(out, spec, compiled, overwrite=overwrite, query_projection=projection)
    seconds = time.perf_counter() - start
    stats = {"documents": len(compiled), "atoms": atom_count, "seconds": round(seconds, 2),
             "atoms_per_second": round(atom_count / max(seconds, 1e-9), 1),
             "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    logger.info("compiled %s", stats)
    return bank, stats
