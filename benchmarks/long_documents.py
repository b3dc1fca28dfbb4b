"""Does doc2atom's cost per question stay flat as the document grows, while in-context reading's grows?

Documents of about 1k, 4k and 16k tokens (fictional synthetic documents, concatenated), the same questions
asked two ways against one real `vllm serve --plugin doc2atom`:
  icl       the whole document in the prompt (refused by the server when it exceeds the model's context)
  doc2atom  the document compiled into a bank by the checkpoint; the question alone in the prompt
Per size and method: answer F1 and containment, time to first token (streamed, median), prompt tokens, and
the per-question memory that grows with the document: the KV cache of the prompt (from the model's shape)
plus, for doc2atom, the composed adapter.

    .venv/bin/python benchmarks/long_documents.py [--sizes 1000 4000 16000] [--questions 8]

Writes benchmarks/results/long_documents.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import openai
from transformers import AutoConfig, AutoTokenizer

from training.amortized.shipped import shipped_checkpoint
from training.compile import compile_documents
from training.data.records import ANSWERABLE
from training.data.synthetic import synthetic_corpus
from training.data.teacher import teacher_messages
from training.evaluate.scoring import best_over, contains, token_f1
from training.models import prepare_model
from training.serve_process import vllm_server

RESULTS = Path(__file__).resolve().parent / "results"


def long_document(size: int, tokenizer, seed: int) -> tuple[str, list]:
    """Concatenate fictional documents until about `size` tokens; their questions come along."""
    corpus = synthetic_corpus(max(4, size // 40), seed=seed)
    parts, questions, tokens = [], [], 0
    for doc_id, doc in corpus.documents.items():
        if tokens >= size:
            break
        parts.append(doc.text)
        tokens += len(tokenizer(doc.text + "\n\n", add_special_tokens=False)["input_ids"])
        questions += [q for q in corpus.questions if q.document_id == doc_id and q.kind == ANSWERABLE]
    return "\n\n".join(parts), questions


def kv_bytes_per_token(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2  # K and V, bf16


def ask(client, model: str, messages, bank: str | None, max_tokens: int) -> dict:
    """Stream one answer: time to first token, the text, the prompt's token count, doc2atom's provenance."""
    start = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"atom_bank": bank} if bank else None)
    first, text, prompt_tokens = None, "", 0
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text += chunk.choices[0].delta.content
        if chunk.usage:
            prompt_tokens = chunk.usage.prompt_tokens
    provenance = json.loads(raw.headers.get("x-doc2atom-provenance", "{}"))
    return {"ttft_s": first if first is not None else time.perf_counter() - start, "text": text,
            "prompt_tokens": prompt_tokens, "provenance": provenance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--questions", type=int, default=8, help="questions per document size")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--checkpoint", help="default: the shipped checkpoint")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--prefix-caching", action="store_true",
                        help="keep vLLM's prefix cache on: repeated questions about one document then reuse its "
                             "KV cache (off by default, so every question pays for reading, as with many documents)")
    args = parser.parse_args()

    model_dir = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    context = min(config.max_position_embeddings, 8192)
    per_token = kv_bytes_per_token(config)
    work = Path(tempfile.mkdtemp(prefix="doc2atom-long-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()

    documents = {}
    for size in args.sizes:
        text, questions = long_document(size, tokenizer, args.seed + size)
        chosen = random.Random(args.seed).sample(questions, min(args.questions, len(questions)))
        bank, stats = compile_documents({f"doc{size}": text}, work / "banks" / f"doc{size}", mode="amortized",
                                        checkpoint=checkpoint, model_dir=model_dir)
        documents[size] = (text, chosen, stats)
        # bf16 bytes of one rank of the composed LoRA: A and B rows over every adapted module
        per_rank = sum(2 * sum(bank.spec.base_model.module_shape(t.module)) for t in bank.spec.targets)
        print(f"{size} tokens: {stats['atoms']} atoms, compiled in {stats['seconds']:.1f} s")

    rows = []
    server_args = [] if args.prefix_caching else ["--no-enable-prefix-caching"]
    with vllm_server(model_dir, work / "banks", work / "serve.log", server_args, max_model_len=context) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
        model = client.models.list().data[0].id
        ask(client, model, [{"role": "user", "content": "Hello"}], None, 2)  # warm-up
        for size, (text, questions, stats) in documents.items():
            doc_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            for method in ("icl", "doc2atom"):
                if method == "icl" and doc_tokens + 64 > context:
                    rows.append({"size": size, "method": method, "document_tokens": doc_tokens,
                                 "skipped": f"document exceeds the model's {context}-token context"})
                    print(f"{size:>6} {method:<9} skipped: exceeds the {context}-token context")
                    continue
                answers = []
                for q in questions:
                    messages = teacher_messages(text, q.question) if method == "icl" else \
                        [{"role": "user", "content": q.question}]
                    answers.append((q, ask(client, model, messages, f"doc{size}" if method == "doc2atom" else None,
                                           args.max_tokens)))
                row = summarize(size, method, doc_tokens, answers, per_token, stats, per_rank)
                rows.append(row)
                print(f"{size:>6} {method:<9} F1 {row['f1']:5.1f}  contains {row['contains']:5.1f}  "
                      f"TTFT {row['ttft_median_s']:.3f} s  prompt {row['prompt_tokens_median']} tok  "
                      f"memory {row['memory_per_question_mb']:.1f} MB")

    result = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, no GPU", "model": model_dir.name,
              "checkpoint": str(checkpoint.name), "settings": vars(args), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_documents.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / "long_documents.png")
    print(f"wrote {RESULTS / 'long_documents.json'} and .png")


def summarize(size, method, doc_tokens, answers, per_token, stats, per_rank) -> dict:
    f1 = [best_over(token_f1, a["text"], q.answers) for q, a in answers]
    hit = [best_over(contains, a["text"], q.answers) for q, a in answers]
    prompt = statistics.median(a["prompt_tokens"] for _, a in answers)
    rank = statistics.median(a["provenance"].get("rank", 0) for _, a in answers)
    return {"size": size, "method": method, "document_tokens": doc_tokens, "questions": len(answers),
            "f1": round(100 * statistics.fmean(f1), 1), "contains": round(100 * statistics.fmean(hit), 1),
            "ttft_median_s": round(statistics.median(a["ttft_s"] for _, a in answers), 4),
            "prompt_tokens_median": int(prompt), "kv_cache_mb": round(prompt * per_token / 2**20, 2),
            "adapter_mb": round(rank * per_rank / 2**20, 2),
            "memory_per_question_mb": round((prompt * per_token + rank * per_rank) / 2**20, 2),
            "refused": sum(bool(a["provenance"].get("refused")) for _, a in answers),
            "atoms_in_bank": stats["atoms"] if method == "doc2atom" else None}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for method, marker in (("icl", "o"), ("doc2atom", "s")):
        mine = [r for r in rows if r["method"] == method and "skipped" not in r]
        xs = [r["document_tokens"] for r in mine]
        for ax, key, label in zip(axes, ("ttft_median_s", "memory_per_question_mb", "f1"),
                                  ("time to first token (s, median)", "KV cache + adapter per question (MB)",
                                   "answer F1")):
            ax.plot(xs, [r[key] for r in mine], marker=marker, label=method)
            ax.set_xscale("log")
            ax.set_xlabel("document tokens")
            ax.set_title(label)
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
