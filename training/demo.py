"""`doc2atom demo`: the runtime core end to end on the packaged default model.

prepare the model -> compile examples/docs into a bank (real atoms and keys; factors are random
until the trained compiler ships) -> route in-scope and off-topic questions -> compose one adapter
-> check with transformers + PEFT that the composed LoRA is exactly Σ w·g·B·A on the base weights.
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


def run_demo(model_dir: Path, docs_dir: Path = EXAMPLE_DOCS, work_dir: Path | None = None) -> bool:
    from vllm_doc2atom.encoders import SentenceTransformerEncoder
    from vllm_doc2atom.router import Router

    from .untrained_bank import build_untrained_bank, default_spec

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="doc2atom-demo-"))
    encoder = SentenceTransformerEncoder()
    documents = {p.stem: p.read_text() for p in sorted(docs_dir.glob("*.md"))}
    start = time.perf_counter()
    bank = build_untrained_bank(work_dir / "bank", default_spec(model_dir, encoder), documents, encoder)
    print(f"\nbank: {len(bank)} atoms from {len(documents)} documents in {time.perf_counter() - start:.1f} s "
          f"-> {bank.path}\n  (micro-LoRA factors are untrained placeholders until the compiler is trained)")

    router = Router(encoder)
    print("\nrouting:")
    routed = []
    for question in QUESTIONS:
        t0 = time.perf_counter()
        result = router.route(bank, question)
        ms = (time.perf_counter() - t0) * 1e3
        routed.append(result)
        if result.refused:
            print(f"  REFUSE  {question}   ({ms:.1f} ms)")
            continue
        print(f"  ANSWER  {question}   ({ms:.1f} ms)")
        for r in result.kept[:3]:
            print(f"          w={r.weight:.2f} {r.atom.id:<30} {r.atom.text[:70]!r}")
    return _check_exactness(model_dir, bank, routed[0].selection, work_dir)


def _check_exactness(model_dir: Path, bank, selection, work_dir: Path) -> bool:
    """Composed adapter through PEFT == base weights + Σ w·g·s·B·A added by hand."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_doc2atom.composer import compose, save_peft_adapter
    from vllm_doc2atom.fingerprint import module_path

    t0 = time.perf_counter()
    adapter = compose(bank, selection, max_rank=64)
    folder = save_peft_adapter(adapter, work_dir / "adapters")
    compose_ms = (time.perf_counter() - t0) * 1e3

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("The harbor of Quillon was built by", return_tensors="pt")
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder)
        peft_logits = peft_model(**inputs).logits
        manual = AutoModelForCausalLM.from_pretrained(model_dir)
        rows = [i for i, _ in adapter.used]
        weights = torch.tensor([w for _, w in adapter.used])
        factors = bank.factors(rows)
        gates = torch.from_numpy(bank.gates[rows])
        for t_no, target in enumerate(bank.spec.targets):
            a, b = factors[target]
            delta = sum(weights[k] * gates[k, t_no] * bank.spec.lora_scaling * b[k] @ a[k] for k in range(len(rows)))
            manual.get_submodule(module_path(target.module, target.layer)).weight += delta
        diff = (manual(**inputs).logits - peft_logits).abs().max().item()
    ok = diff < 1e-4
    print(f"\ncomposed {len(adapter.used)} atoms -> rank-{adapter.rank} LoRA {adapter.name} (id {adapter.int_id}) "
          f"in {compose_ms:.1f} ms\nPEFT vs hand-merged logits: max |diff| = {diff:.2e}  "
          f"[{'OK' if ok else 'FAILED'}: < 1e-4]")
    return ok
