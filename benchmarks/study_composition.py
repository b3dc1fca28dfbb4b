"""Do self-study atoms compose? For each answerable question of a built dataset: the answer with its gold atom
alone, gold + 1 and + 3 random atoms of the same document (weight 1), and the server's real routing — gold
answer inside the reply, per setting. One bank per document, compiled with `--mode study`; answers by
transformers + PEFT with the plugin's router and composer (the eval's `transformers` backend).

Greedy replies of a 135M model flip on small changes, so a few dozen questions give a noisy containment. Each
setting also gets a low-noise number: the gold-span NLL — the mean loss of the gold answer's tokens inside the
teacher's own answer (the base model reading the document), teacher-forced, with the question alone and the
composed atoms (questions whose teacher answer holds no gold answer are left out).

    .venv/bin/python benchmarks/study_composition.py --data data/fresh_validation --split validation --limit 4

Prints a table and saves benchmarks/results/study_composition.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.compile import StudyCompiler, StudyConfig  # noqa: E402
from training.evaluate.artifacts import artifact_name  # noqa: E402
from training.evaluate.backends import TransformersBackend  # noqa: E402
from training.evaluate.harness import load_items  # noqa: E402
from training.evaluate.scoring import best_over, contains  # noqa: E402
from training.models import DEFAULT_MODEL, PACKAGED_MODELS, prepare_model  # noqa: E402

SETTINGS = ("gold alone", "gold + 1", "gold + 3", "routed")


def measure(data: str, split: str, limit: int, model_dir: Path, config: StudyConfig, work: Path) -> dict:
    """Compile one bank per document with `config`, then answer every answerable question in each setting."""
    from vllm_doc2atom.composer import compose, save_peft_adapter

    _, documents, items = load_items(data, split, limit, 0)
    gold = {q["id"]: q["labels"]["gold"] for q in map(json.loads, open(Path(data) / "questions.jsonl"))}
    compiler = StudyCompiler(model_dir, config)
    start, atoms = time.perf_counter(), 0
    for doc_id, text in documents.items():
        compiled = compiler(doc_id, text)
        atoms += len(compiled.atoms)
        compiler.create_bank(work / "banks" / artifact_name("doc2atom_study", doc_id), [compiled], overwrite=True)
    compile_seconds = time.perf_counter() - start
    factor_bytes = sum(f.stat().st_size for f in (work / "banks").rglob("*.safetensors"))

    rng = random.Random(0)
    hits: dict[str, list[bool]] = {s: [] for s in SETTINGS}
    span_nll: dict[str, list[float]] = {s: [] for s in SETTINGS}
    answerable = [i for i in items if i.kind == "answerable"]
    with TransformersBackend(model_dir, work, 32, 64, 8, None) as backend:
        teacher = teacher_gold_spans(backend, documents, answerable)
        for item in answerable:
            bank = backend.banks.get(artifact_name("doc2atom_study", item.document_id))
            rows = [r for r, a in enumerate(bank.atoms) if a.id in gold[item.question_id]]
            if not rows:
                continue  # the answer spans atoms the rule atomizer cut differently
            others = [r for r in range(len(bank)) if r not in rows]
            selections = {"gold alone": [(r, 1.0) for r in rows],
                          "gold + 1": [(r, 1.0) for r in rows + rng.sample(others, min(1, len(others)))],
                          "gold + 3": [(r, 1.0) for r in rows + rng.sample(others, min(3, len(others)))]}
            routed = backend.routers.route(bank, item.question)  # as the server routes (a refusal: a miss)
            if routed.refused:
                hits["routed"].append(False)
            else:
                selections["routed"] = routed.selection
            for setting, selection in selections.items():
                adapter = save_peft_adapter(compose(bank, selection, backend.max_lora_rank), backend.scratch)
                text, _ = backend._generate([{"role": "user", "content": item.question}], adapter)
                hits[setting].append(bool(best_over(contains, text, item.answers)))
                if item.question_id in teacher:
                    span_nll[setting].append(gold_span_nll(backend, adapter, item.question, *teacher[item.question_id]))

    return {"data": Path(data).name, "split": split, "documents": len(documents), "atoms": atoms,
            "modules": ",".join(config.modules), "layers": config.last_layers, "rank": config.rank,
            "steps": config.fit.steps, "questions": len(hits["routed"]),
            "compile_seconds_per_atom": round(compile_seconds / max(atoms, 1), 2),
            "bytes_per_atom": round(factor_bytes / max(atoms, 1)),
            "contains_percent": {s: round(100 * sum(h) / max(len(h), 1), 1) for s, h in hits.items()},
            "gold_span_nll": {s: round(sum(v) / len(v), 3) if v else None for s, v in span_nll.items()},
            "gold_span_questions": len(span_nll["gold alone"]),
            "study": compiler.stats()}


def teacher_gold_spans(backend: TransformersBackend, documents: dict[str, str],
                       items: list) -> dict[str, tuple[list[int], list[bool]]]:
    """question id -> (the teacher's greedy answer tokens, which of them spell a gold answer), for the questions
    whose teacher answer holds one."""
    from training.data.teacher import teacher_messages
    from training.study.generation import chat_prompt_ids, generate

    tokenizer = backend.tokenizer
    prompts = [chat_prompt_ids(tokenizer, teacher_messages(documents[i.document_id], i.question)) for i in items]
    found = {}
    for item, answer in zip(items, generate(backend.model, tokenizer, prompts, 24)):
        ends = [len(tokenizer.decode(answer.tokens[: j + 1], skip_special_tokens=True)) for j in
                range(len(answer.tokens))]
        text = tokenizer.decode(answer.tokens, skip_special_tokens=True).lower()
        for gold in item.answers:
            at = text.find(gold.lower())
            if at >= 0 and answer.tokens:
                starts = [0] + ends[:-1]
                found[item.question_id] = (answer.tokens, [s < at + len(gold) and e > at for s, e in zip(starts, ends)])
                break
    return found


def gold_span_nll(backend: TransformersBackend, adapter: Path, question: str, tokens: list[int],
                  gold: list[bool]) -> float:
    """Mean loss of the gold tokens of the teacher's answer, teacher-forced, question alone + the adapter."""
    import torch
    from peft import PeftModel

    from training.study.generation import chat_prompt_ids

    prompt = chat_prompt_ids(backend.tokenizer, [{"role": "user", "content": question}])
    model = PeftModel.from_pretrained(backend.model, adapter)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    finally:
        model.unload()
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens), reduction="none")
    return losses[torch.tensor(gold)].mean().item()


def config_from(modules: str, layers: int, rank: int, steps: int) -> StudyConfig:
    defaults = StudyConfig()
    return StudyConfig(modules=tuple(modules.split(",")), last_layers=layers, rank=rank,
                       fit=replace(defaults.fit, steps=steps))


def data_arguments(description: str, limit: int) -> argparse.ArgumentParser:
    """The arguments both self-study benchmarks take: which documents, which split, which base model."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder from `doc2atom data build` (gold atoms labelled)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=limit, help="documents")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    return parser


def model_folder(name: str) -> Path:
    return prepare_model(name) if name in PACKAGED_MODELS else Path(name)


def main() -> None:
    parser = data_arguments(__doc__, limit=4)
    parser.add_argument("--out", default="benchmarks/results/study_composition.json")
    parser.add_argument("--work", default="runs/study-composition", help="banks and adapters")
    defaults = StudyConfig()
    parser.add_argument("--modules", default=",".join(defaults.modules))
    parser.add_argument("--layers", type=int, default=defaults.last_layers)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--steps", type=int, default=defaults.fit.steps)
    args = parser.parse_args()

    model_dir = model_folder(args.model)
    config = config_from(args.modules, args.layers, args.rank, args.steps)
    result = measure(args.data, args.split, args.limit, model_dir, config, Path(args.work))
    print("| setting | gold answer in reply | gold-span NLL |\n|---|---|---|")
    for setting, value in result["contains_percent"].items():
        print(f"| {setting} | {value} % | {result['gold_span_nll'][setting]} |")
    print(f"{result['questions']} questions, {result['documents']} documents, {result['atoms']} atoms, "
          f"{result['compile_seconds_per_atom']} s per atom, {result['bytes_per_atom']} bytes per atom")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
