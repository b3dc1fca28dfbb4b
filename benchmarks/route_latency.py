"""Whole-route latency as the server routes: question -> MiniLM -> cosine top-8 -> the shipped reranker.

For banks of 1e3 .. 1e6 atoms (random unit keys, atom texts drawn from real documents), one question at a time,
`Router.route` with stage 1 alone and with the reranker scoring the 8 candidates. Prints p50 / p99 per size and
saves JSON. Target (issue 29): stage 1 + rerank p50 <= 25 ms, p99 <= 60 ms on a 2-core CPU, flat in the size.

    .venv/bin/python benchmarks/route_latency.py [--sizes 1000 10000 100000 1000000]
        [--queries 200] [--top-k 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path, PurePath

import numpy as np

from vllm_doc2atom.bank_interface import AtomRecord, BankSpec, Target
from vllm_doc2atom.encoders import SentenceTransformerEncoder
from vllm_doc2atom.fingerprint import BaseModelFingerprint
from vllm_doc2atom.reranker import shipped_identity
from vllm_doc2atom.router import Router, RouterConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "docs"
QUESTIONS = ["How tall is the Amber Needle lighthouse?", "Who wrote the Velmora Orchard Protocol?",
             "Which comet did astronomers at Brightwater discover?", "When was the bridge over the Ost finished?",
             "What does the Halvenite alloy resist?", "Who led the expedition to the northern glacier?"]


class Atoms:
    """A million AtomRecords without a million objects: built on access from a few real sentences."""

    def __init__(self, size: int, sentences: list[str]) -> None:
        self.size, self.sentences = size, sentences

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, row: int) -> AtomRecord:
        text = self.sentences[row % len(self.sentences)]
        return AtomRecord(id=f"doc{row // 10}#{row % 10}", document_id=f"doc{row // 10}", type="fact_claim", text=text,
                          span=(0, len(text)), retrieval_text=f"Document {row // 10}: {text}")


@dataclasses.dataclass
class MemoryBank:
    """What Router reads of a bank, held in memory (a RoutableBank without shards)."""

    name: str
    spec: BankSpec
    fingerprint: str
    atoms: Atoms
    keys: np.ndarray
    path: PurePath = PurePath("memory")

    def __len__(self) -> int:
        return len(self.atoms)

    def reranker_folders(self) -> list[Path]:
        return []


def bank(size: int, dim: int, reranked: bool, sentences: list[str], seed: int) -> MemoryBank:
    keys = np.random.default_rng(seed).standard_normal((size, dim), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    base = BaseModelFingerprint(name="benchmark", architecture="LlamaForCausalLM", hidden_size=64,
                                intermediate_size=128, num_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                head_dim=16, vocab_size=100)
    spec = BankSpec(base_model=base, targets=[Target("down_proj", 1)], micro_rank=2,
                    key_encoder="sentence-transformers/all-MiniLM-L6-v2", key_dim=dim,
                    router_head={"sim_scale": 0.0, "max_atoms": 3, "same_document": True} if reranked else None,
                    reranker=shipped_identity().to_dict() if reranked else None)
    return MemoryBank(f"bank-{size}", spec, f"{size}-{reranked}-{seed}", Atoms(size, sentences), keys)


def measure(router: Router, routed: MemoryBank, queries: int) -> dict[str, float]:
    for question in QUESTIONS:  # warm-up: index built, models loaded
        router.route(routed, question)
    latencies = []
    for i in range(queries):
        start = time.perf_counter()
        router.route(routed, QUESTIONS[i % len(QUESTIONS)])
        latencies.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=RouterConfig().top_k,
                        help="stage-1 candidates the reranker reads (the server's --doc2atom-top-k)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "route_latency.json"))
    args = parser.parse_args()

    sentences = [s.strip() + "." for p in sorted(EXAMPLES.glob("*.md")) for s in p.read_text().split(".")
                 if len(s.split()) > 5]
    encoder = SentenceTransformerEncoder()
    router = Router(encoder, RouterConfig(top_k=args.top_k))
    rows = []
    print(f"{'atoms':>9} {'stage 1 p50':>12} {'p99':>7} {'+ rerank p50':>13} {'p99':>7}  (ms)")
    for size in args.sizes:
        row = {"atoms": size}
        for reranked in (False, True):
            routed = bank(size, encoder.dim, reranked, sentences, args.seed)
            row["reranked" if reranked else "stage1"] = measure(router, routed, args.queries)
            router._indexes.clear()  # one bank's index at a time (a million keys is 1.5 GB)
        rows.append(row)
        s1, s2 = row["stage1"], row["reranked"]
        print(f"{size:>9} {s1['p50_ms']:>12.2f} {s1['p99_ms']:>7.2f} {s2['p50_ms']:>13.2f} {s2['p99_ms']:>7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    result = {"machine": machine, "top_k": args.top_k, "reranker": shipped_identity().to_dict(), "results": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
