"""`doc2atom demo`: the product end to end on the packaged default model.

prepare SmolLM2-135M-Instruct -> compile examples/docs into an atom bank (self-study by default) ->
start `vllm serve MODEL --plugin doc2atom` -> ask in-scope and off-topic questions with the openai SDK ->
print each answer (from the composed adapter alone, then with the routed atoms' text too) with the atoms (and
spans) it was composed from, and the refusals -> stop, clean up.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from .data.teacher import TEACHER_SYSTEM

logger = logging.getLogger(__name__)

EXAMPLE_DOCS = Path(__file__).resolve().parent.parent / "examples" / "docs"
# (question, the document's answer; None: off-topic, the bank should refuse)
QUESTIONS = [
    ("How tall is the Amber Needle lighthouse?", "41 meters"),
    ("Who wrote the Velmora Orchard Protocol?", "Irena Soltz"),
    ("Which comet was discovered at Brightwater Observatory?", "Saffi-Lund"),
    ("Who is the harbor master of Quillon?", "Teodor Plash"),
    ("What is the best way to cook risotto?", None),
    ("Who won the football world cup in 1998?", None),
]
# Each in-scope question is asked twice: from the composed adapter alone (parametric memory), and with the
# routed atoms' own text before it as well (`atom_evidence`), under the instruction the evaluation gives it.
EVIDENCE = "only"
SHORT_ANSWER = {"role": "system", "content": TEACHER_SYSTEM}  # the instruction ICL and the teacher read


def run_demo(model_dir: Path, checkpoint: Path | None = None, work_dir: Path | None = None, keep: bool = False,
             mode: str = "study") -> bool:
    import openai

    from .compile import compile_documents, read_documents
    from .evaluate.scoring import contains
    from .serve_process import vllm_server

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="doc2atom-demo-"))
    try:
        documents = read_documents(sorted(EXAMPLE_DOCS.glob("*.md")))
        bank, stats = compile_documents(documents, work_dir / "banks" / "examples", mode=mode,
                                        checkpoint=checkpoint, model_dir=model_dir)
        how = "self-study" if mode == "study" else f"{checkpoint.name} ({mode})"
        print(f"\natom bank 'examples': {stats['atoms']} atoms from {stats['documents']} documents, compiled by "
              f"{how} in {stats['seconds']:.1f} s ({stats['seconds_per_atom']:.1f} s per atom)")

        print(f"\nstarting vllm serve {model_dir.name} --plugin doc2atom (about a minute on a CPU) ...")
        right = {"adapter": 0, "evidence": 0, "refused": 0}
        with vllm_server(model_dir, work_dir / "banks", work_dir / "serve.log") as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            model = client.models.list().data[0].id

            def ask(messages: list[dict[str, str]], **extra) -> tuple[str, dict, float]:
                t0 = time.perf_counter()
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=48,
                                                       temperature=0, extra_body={"atom_bank": "examples", **extra})
                return (reply.choices[0].message.content.strip(), reply.model_extra["doc2atom"],
                        time.perf_counter() - t0)

            def verdict(answer: str, provenance: dict, expected: str) -> bool:
                return not provenance["refused"] and bool(contains(answer, expected))

            for question, expected in QUESTIONS:
                answer, provenance, seconds = ask([{"role": "user", "content": question}])
                if expected is None:
                    handled = provenance["refused"]
                    right["refused"] += handled
                    print(f"\nQ: {question}\nA: {answer}   ({seconds:.2f} s; "
                          f"{'refused, as it should' if handled else 'answered an off-topic question'})")
                    continue
                handled = verdict(answer, provenance, expected)
                right["adapter"] += handled
                print(f"\nQ: {question}   (the document says: {expected})\n"
                      f"A: {answer}   ({seconds:.2f} s; adapter only: {'right' if handled else 'wrong'})")
                if provenance["refused"]:
                    print("   refused: no atom of the bank covers this question (no model call)")
                    continue
                text_answer, text_provenance, seconds = ask([SHORT_ANSWER, {"role": "user", "content": question}],
                                                            atom_evidence=EVIDENCE)
                handled = verdict(text_answer, text_provenance, expected)
                right["evidence"] += handled
                print(f"A: {text_answer}   ({seconds:.2f} s; atom_evidence={EVIDENCE!r}: "
                      f"{'right' if handled else 'wrong'})")
                print(f"   composed {len(provenance['atoms'])} atoms into a rank-{provenance['rank']} LoRA "
                      f"({'cached' if provenance['cache_hit'] else 'new'} adapter {provenance['adapter']}):")
                for atom in provenance["atoms"]:
                    start, end = atom["span"]
                    reranked = f" rerank {atom['rerank_score']:+.1f}" if "rerank_score" in atom else ""
                    print(f"   - w={atom['weight']:.2f}{reranked} {atom['id']:<28} "
                          f"{documents[atom['document_id']][start:end][:72]!r}")
        in_scope = sum(expected is not None for _, expected in QUESTIONS)
        print(f"\nfacts right: {right['adapter']} of {in_scope} from the adapter alone, {right['evidence']} of "
              f"{in_scope} with atom_evidence={EVIDENCE!r}; off-topic refused: {right['refused']} of "
              f"{len(QUESTIONS) - in_scope}; server stopped")
        return True
    finally:
        if keep:
            print(f"bank and server log kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
