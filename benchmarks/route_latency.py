"""Whole-route latency as the server routes: question -> MiniLM -> cosine top-8 -> the shipped reranker.

For banks of 1e3 .. 1e6 atoms (atom texts drawn from the example documents; the first of them keyed by their
text, the rest by random unit keys), one question at a time, `Router.route` with stage 1 alone and with the
reranker as compiled banks are routed (`RERANKED_HEAD`: it reads the best 4 candidates, and the other 4 only
when none of those is sure). Questions about the documents and off-topic ones; the questions where the
reranker read 4 candidates and those where it read 8 are timed apart (`router eval` counts how often each
happens on real questions). Prints p50 / p99 per size and saves JSON. Target (issue 29): stage 1 +
rerank p50 <= 25 ms, p99 <= 60 ms on a 2-core CPU, flat in the size.

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

from training.compile.study_routing import RERANKED_HEAD
from vllm_doc2atom.bank_interface import AtomRecord, BankSpec, Target
from vllm_doc2atom.encoders import SentenceTransformerEncoder
from vllm_doc2atom.fingerprint import BaseModelFingerprint
from vllm_doc2atom.reranker import shipped_identity
from vllm_doc2atom.router import Router, RouterConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "docs"
QUESTIONS = ["How tall is the Amber Needle lighthouse?", "Who wrote the Velmora Orchard Protocol?",
             "Which comet did astronomers at Brightwater discover?", "What is the Amber Needle built from?",
             "Where is the Velmora Orchard Protocol used?", "What telescope does Brightwater Observatory use?"]
OFF_TOPIC = ["What is the best way to cook risotto?", "How do I change a bicycle tyre?",
             "Who won the football world cup in 1998?", "What is the capital of Australia?",
             "How many legs does a spider have?", "What is a good name for a cat?"]


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


def bank(size: int, encoder: SentenceTransformerEncoder, reranked: bool, sentences: list[str],
         seed: int) -> MemoryBank:
    keys = np.random.default_rng(seed).standard_normal((size, encoder.dim), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    atoms = Atoms(size, sentences)
    real = min(size, len(sentences))  # the documents' own atoms, keyed as a compile keys them
    keys[:real] = encoder.encode([atoms[row].retrieval_text for row in range(real)])
    base = BaseModelFingerprint(name="benchmark", architecture="LlamaForCausalLM", hidden_size=64,
                                intermediate_size=128, num_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                head_dim=16, vocab_size=100)
    spec = BankSpec(base_model=base, targets=[Target("down_proj", 1)], micro_rank=2,
                    key_encoder="sentence-transformers/all-MiniLM-L6-v2", key_dim=encoder.dim,
                    router_head=dataclasses.asdict(RERANKED_HEAD) if reranked else None,
                    reranker=shipped_identity().to_dict() if reranked else None)
    return MemoryBank(f"bank-{size}", spec, f"{size}-{reranked}-{seed}", atoms, keys)


def measure(router: Router, routed: MemoryBank, queries: int) -> dict[str, dict[str, float]]:
    """p50 / p99 over the questions, apart by how many candidates the reranker read (stage 1 alone: all 8)."""
    questions = QUESTIONS + OFF_TOPIC
    for question in questions:  # warm-up: index built, models loaded
        router.route(routed, question)
    latencies: dict[str, list[float]] = {}
    for i in range(queries):
        start = time.perf_counter()
        result = router.route(routed, questions[i % len(questions)])
        latencies.setdefault(f"{len(result.candidates)} read", []).append((time.perf_counter() - start) * 1e3)
    return {read: {"questions": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                   "p99_ms": round(float(np.percentile(ms, 99)), 2)} for read, ms in sorted(latencies.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=RouterConfig().top_k,
                        help="stage-1 candidates (the server's --doc2atom-top-k)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "route_latency.json"))
    args = parser.parse_args()

    sentences = [s.strip() + "." for p in sorted(EXAMPLES.glob("*.md")) for s in p.read_text().split(".")
                 if len(s.split()) > 5]
    encoder = SentenceTransformerEncoder()
    router = Router(encoder, RouterConfig(top_k=args.top_k))
    rows = []
    first = RERANKED_HEAD.rerank_first
    print(f"{'atoms':>9} {'stage 1 p50':>12} {'p99':>7} {f'rerank {first} p50':>15} {'p99':>7} "
          f"{f'rerank {args.top_k} p50':>15} {'p99':>7}  (ms)")
    for size in args.sizes:
        row = {"atoms": size}
        for reranked in (False, True):
            routed = bank(size, encoder, reranked, sentences, args.seed)
            row["reranked" if reranked else "stage1"] = measure(router, routed, args.queries)
            router._indexes.clear()  # one bank's index at a time (a million keys is 1.5 GB)
        rows.append(row)
        cells = [row["stage1"][f"{args.top_k} read"], row["reranked"].get(f"{first} read"),
                 row["reranked"].get(f"{args.top_k} read")]
        print(f"{size:>9} " + " ".join(f"{c['p50_ms']:>{w}.2f} {c['p99_ms']:>7.2f}" if c else f"{'-':>{w}} {'-':>7}"
                                       for c, w in zip(cells, (12, 15, 15))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    result = {"machine": machine, "top_k": args.top_k, "reranker": shipped_identity().to_dict(),
              "head": dataclasses.asdict(RERANKED_HEAD), "results": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
