"""What does doc2atom add to a request? Latency and throughput against a real `vllm serve --plugin doc2atom`.

Scenarios, each answering with exactly --max-tokens tokens (ignore_eos), greedy, routing included:
  (a) base      the base model, no adapter
  (b) lora      a LoRA pre-registered at start-up (--lora-modules), of the same rank as (c)
  (c) cached    doc2atom, a selection whose composed adapter is already registered
  (d) new       doc2atom, a new selection every request (route + compose + write + register + load)
Throughput: 8 concurrent clients naming 8 different banks vs 8 clients sharing the pre-registered LoRA.
Targets: (c)/(b) <= 1.05 and (d)/(b) <= 1.10 at the median; 8-bank throughput >= 0.8x the shared LoRA's.

    .venv/bin/python benchmarks/serve_overhead.py [--requests 10] [--max-tokens 64]

Banks hold untrained factors: the cost of serving does not depend on what the factors learned.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

from training.demo import EXAMPLE_DOCS
from training.models import prepare_model
from training.serve_process import vllm_server
from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.composer import compose, save_peft_adapter
from vllm_doc2atom.encoders import SentenceTransformerEncoder
from vllm_doc2atom.router import Router

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: its tests' bank fixtures
from tests.untrained_bank import build_untrained_bank, default_spec  # noqa: E402

QUESTION = "Who wrote the Velmora Orchard Protocol?"


def build_banks(model_dir: Path, root: Path, count: int) -> list[str]:
    """`count` banks with the example documents; distinct seeds give distinct contents, so distinct adapters."""
    encoder = SentenceTransformerEncoder()
    spec = default_spec(model_dir, encoder)
    documents = {p.stem: p.read_text() for p in EXAMPLE_DOCS.glob("*.md")}
    names = [f"bank{i:03d}" for i in range(count)]
    for seed, name in enumerate(names):
        build_untrained_bank(root / name, spec, documents, encoder, seed=seed)
    return names


def static_adapter(bank_path: Path, out: Path) -> tuple[Path, int]:
    """The adapter doc2atom would compose for QUESTION, registered statically as the (b) baseline."""
    bank = AtomBank.load(bank_path)
    adapter = compose(bank, Router(SentenceTransformerEncoder()).route(bank, QUESTION).selection)
    return save_peft_adapter(adapter, out), adapter.rank


def timed(client: openai.OpenAI, model: str, max_tokens: int, bank: str | None = None) -> float:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True, **({"atom_bank": bank} if bank else {})})
    assert reply.usage.completion_tokens == max_tokens
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    return {"median_s": round(statistics.median(seconds), 4), "p90_s": round(float(np.percentile(seconds, 90)), 4),
            "n": len(seconds)}


def throughput(client: openai.OpenAI, models_and_banks: list[tuple[str, str | None]], per_client: int,
               max_tokens: int) -> float:
    """Generated tokens per second with one thread per (model, bank) client."""
    def run(model_bank):
        for _ in range(per_client):
            timed(client, model_bank[0], max_tokens, model_bank[1])

    start = time.perf_counter()
    with ThreadPoolExecutor(len(models_and_banks)) as pool:
        list(pool.map(run, models_and_banks))
    return len(models_and_banks) * per_client * max_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=10, help="requests per latency scenario")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client in the throughput runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_overhead.json"))
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else prepare_model()
    work = Path(tempfile.mkdtemp(prefix="doc2atom-bench-"))
    banks = build_banks(model_dir, work / "banks", 1 + args.requests + args.clients)
    lora_path, rank = static_adapter(work / "banks" / banks[0], work / "static")
    extra = ["--lora-modules", f"static={lora_path}"]
    results: dict = {"model": str(model_dir.name), "max_tokens": args.max_tokens, "adapter_rank": rank,
                     "machine": {"processor": platform.processor() or platform.machine()}}
    with vllm_server(model_dir, work / "banks", work / "serve.log", extra) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600)
        base = next(m.id for m in client.models.list().data if m.id != "static")
        for _ in range(2):  # warm-up: first requests pay one-time costs (encoder load, kernels)
            timed(client, base, 8), timed(client, "static", 8), timed(client, base, 8, banks[0])
        n = args.requests
        latency = {
            "a_base": [timed(client, base, args.max_tokens) for _ in range(n)],
            "b_lora": [timed(client, "static", args.max_tokens) for _ in range(n)],
            "c_doc2atom_cached": [timed(client, base, args.max_tokens, banks[0]) for _ in range(n)],
            "d_doc2atom_new": [timed(client, base, args.max_tokens, banks[1 + i]) for i in range(n)],
        }
        results["latency"] = {k: summary(v) for k, v in latency.items()}
        b = results["latency"]["b_lora"]["median_s"]
        results["ratios"] = {"c_over_b": round(results["latency"]["c_doc2atom_cached"]["median_s"] / b, 4),
                             "d_over_b": round(results["latency"]["d_doc2atom_new"]["median_s"] / b, 4)}
        eight_banks = [(base, banks[1 + n + i]) for i in range(args.clients)]
        throughput(client, eight_banks, 1, 8)  # register their adapters first: measure steady state
        shared = throughput(client, [("static", None)] * args.clients, args.per_client, args.max_tokens)
        multi = throughput(client, eight_banks, args.per_client, args.max_tokens)
        results["throughput_tokens_per_s"] = {"shared_lora": round(shared, 2), "banks": round(multi, 2),
                                              "ratio": round(multi / shared, 4)}

    print(f"{'scenario':<20} {'median s':>9} {'p90 s':>8}")
    for name, row in results["latency"].items():
        print(f"{name:<20} {row['median_s']:>9.3f} {row['p90_s']:>8.3f}")
    print(f"(c)/(b) = {results['ratios']['c_over_b']:.3f}   (target <= 1.05)")
    print(f"(d)/(b) = {results['ratios']['d_over_b']:.3f}   (target <= 1.10)")
    t = results["throughput_tokens_per_s"]
    print(f"throughput, {args.clients} clients: shared LoRA {t['shared_lora']:.1f} tok/s, "
          f"{args.clients} banks {t['banks']:.1f} tok/s, ratio {t['ratio']:.3f}   (target >= 0.8)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
