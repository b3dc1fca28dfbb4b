"""`doc2atom demo`: the product end to end on the packaged default model.

prepare SmolLM2-135M-Instruct -> compile examples/docs into an atom bank -> start
`vllm serve MODEL --plugin doc2atom` -> ask in-scope and off-topic questions with the openai SDK
-> print each answer with the atoms (and spans) it was composed from, and the refusals -> stop.

Until the trained compiler ships, the bank holds real atoms and keys but random micro-LoRA factors:
routing, refusal, composition and serving are real; the answers do not yet use the documents.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLE_DOCS = Path(__file__).resolve().parent.parent / "examples" / "docs"
QUESTIONS = [
    "How tall is the Amber Needle lighthouse?",
    "Who wrote the Velmora Orchard Protocol?",
    "Which comet was discovered at Brightwater Observatory?",
    "What is the best way to cook risotto?",
    "Who won the football world cup in 1998?",
]


def build_demo_bank(model_dir: Path, bank_root: Path, docs_dir: Path = EXAMPLE_DOCS):
    from vllm_doc2atom.encoders import SentenceTransformerEncoder

    from .untrained_bank import build_untrained_bank, default_spec

    encoder = SentenceTransformerEncoder()
    documents = {p.stem: p.read_text() for p in sorted(docs_dir.glob("*.md"))}
    return build_untrained_bank(bank_root / "examples", default_spec(model_dir, encoder), documents, encoder), \
        documents


def run_demo(model_dir: Path, work_dir: Path | None = None) -> bool:
    import openai

    from .serve_process import vllm_server

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="doc2atom-demo-"))
    start = time.perf_counter()
    bank, documents = build_demo_bank(model_dir, work_dir / "banks")
    print(f"\natom bank 'examples': {len(bank)} atoms from {len(documents)} documents "
          f"({time.perf_counter() - start:.1f} s)\n  micro-LoRA factors are untrained placeholders until the "
          "compiler is trained: routing and serving are real, answers are not yet grounded")

    print(f"\nstarting vllm serve {model_dir.name} --plugin doc2atom (about a minute on a CPU) ...")
    with vllm_server(model_dir, work_dir / "banks", work_dir / "serve.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        model = client.models.list().data[0].id
        for question in QUESTIONS:
            t0 = time.perf_counter()
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0,
                extra_body={"atom_bank": "examples"})
            seconds = time.perf_counter() - t0
            provenance = reply.model_extra["doc2atom"]
            print(f"\nQ: {question}\nA: {reply.choices[0].message.content.strip()}   ({seconds:.2f} s)")
            if provenance["refused"]:
                print("   refused: no atom of the bank covers this question (no model call)")
                continue
            print(f"   composed {len(provenance['atoms'])} atoms into a rank-{provenance['rank']} LoRA "
                  f"({'cached' if provenance['cache_hit'] else 'new'} adapter {provenance['adapter']}):")
            for atom in provenance["atoms"]:
                start_char, end_char = atom["span"]
                print(f"   - w={atom['weight']:.2f} {atom['id']:<28} "
                      f"{documents[atom['document_id']][start_char:end_char][:72]!r}")
    print(f"\nserver stopped; log and bank in {work_dir}")
    return True
