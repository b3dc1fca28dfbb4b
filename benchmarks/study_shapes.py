"""Which adapter shape should self-study atoms have? For each shape (adapted modules x last layers x rank):
gold answer inside the reply with the gold atom alone, + 1 and + 3 random atoms, and the server's real routing,
and the low-noise gold-span NLL (`study_composition.measure`), bytes per atom, and compile seconds per atom (no
cache: every stage timed).

    .venv/bin/python benchmarks/study_shapes.py --data data/fresh_validation --limit 6 \\
        --shape down_proj:4:4 --shape down_proj:4:8 --shape gate_proj,up_proj,down_proj:4:4

A shape is MODULES:LAYERS:RANK. Prints a markdown table; saves JSON and a plot (routed containment against
seconds per atom, marker size = bytes per atom) next to --out. Tune on validation documents only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study_composition import SETTINGS, config_from, data_arguments, measure, model_folder  # noqa: E402

from training.compile import StudyConfig  # noqa: E402

DEFAULT_SHAPES = ("down_proj:4:4", "down_proj:4:8", "down_proj:8:4", "down_proj:2:4",
                  "gate_proj,up_proj,down_proj:4:4", "o_proj,down_proj:4:4")


def parse_shape(text: str) -> tuple[str, int, int]:
    try:
        modules, layers, rank = text.split(":")
        return modules, int(layers), int(rank)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not MODULES:LAYERS:RANK (e.g. down_proj:4:4)")


def table(results: list[dict]) -> str:
    lines = ["| modules | layers | rank | " + " | ".join(SETTINGS) + " | gold-span NLL alone / routed "
             "| KB per atom | s per atom |", "|---|---|---|" + "---|" * len(SETTINGS) + "---|---|---|"]
    for r in results:
        cells = " | ".join(f"{r['contains_percent'][s]}" for s in SETTINGS)
        nll = r["gold_span_nll"]
        lines.append(f"| {r['modules']} | {r['layers']} | {r['rank']} | {cells} | {nll['gold alone']} / "
                     f"{nll['routed']} | {r['bytes_per_atom'] / 1e3:.0f} | {r['compile_seconds_per_atom']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        x, y = r["compile_seconds_per_atom"], r["contains_percent"]["routed"]
        ax.scatter(x, y, s=20 + r["bytes_per_atom"] / 2e3, alpha=0.6)
        ax.annotate(f"{r['modules'].replace('_proj', '')} L{r['layers']} r{r['rank']}", (x, y), fontsize=7)
    ax.set_xlabel("compile seconds per atom")
    ax.set_ylabel("gold answer in reply, routed (%)")
    ax.set_title("Self-study adapter shapes (marker area ~ bytes per atom)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = data_arguments(__doc__, limit=6)
    parser.add_argument("--shape", action="append", type=parse_shape, help="MODULES:LAYERS:RANK (repeatable)")
    parser.add_argument("--steps", type=int, default=StudyConfig().fit.steps)
    parser.add_argument("--out", default="benchmarks/results/study_shapes.json")
    parser.add_argument("--work", default="runs/study-shapes", help="banks and adapters, one folder per shape")
    args = parser.parse_args()

    model_dir = model_folder(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for modules, layers, rank in args.shape or [parse_shape(s) for s in DEFAULT_SHAPES]:
        config = replace(config_from(modules, layers, rank, args.steps), cache=False)  # time every stage
        work = Path(args.work) / f"{modules.replace(',', '+')}-L{layers}-r{rank}"
        results.append(measure(args.data, args.split, args.limit, model_dir, config, work))
        print(table(results[-1:]).splitlines()[-1], flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive an interrupted sweep
        plot(results, out.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
