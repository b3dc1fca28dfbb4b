"""The evaluation's outputs: a Markdown table, the JSON of every number and setting, a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_doc2atom.files import atomic_file, atomic_write_text

COLUMNS = [("F1", "f1"), ("EM", "em"), ("contains", "contains"), ("gold NLL", "gold_nll"),
           ("refusal P", "refusal_precision"), ("refusal R", "refusal_recall"), ("refusal F1", "refusal_f1"),
           ("off-topic refusal F1", "off_topic_refusal_f1"), ("answerable refused", "answerable_refused"),
           ("latency p50 s", "latency_median_s"),
           ("prompt tokens", "prompt_tokens_mean")]
COST_COLUMNS = [("compile s/doc", "compile_seconds_per_document"), ("compile peak MB", "compile_peak_memory_mb"),
                ("KB/doc", "bytes_per_document")]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per method and dataset, then the method's overall row (costs on the overall row)."""
    header = ["method", "dataset", "questions", *(c for c, _ in COLUMNS), *(c for c, _ in COST_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in results["methods"].items():
        scopes = list(entry["datasets"].items())
        if len(scopes) > 1:
            scopes.append(("all", entry["overall"]))
        for dataset, scores in scopes:
            costs = [entry.get(k) for _, k in COST_COLUMNS] if dataset in ("all", scopes[0][0]) else [None] * 3
            if costs[2] is not None:
                costs[2] = round(costs[2] / 1024, 1)
            cells = [method, dataset, scores["questions"], *(scores[k] for _, k in COLUMNS), *costs]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if results.get("skipped"):
        lines.append("")
        lines += [f"- {m} not run: {why}" for m, why in results["skipped"].items()]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: answer F1, containment and refusal F1 per method, one group per dataset."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    datasets = list(next(iter(results["methods"].values()))["datasets"]) if methods else []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    width = 0.8 / max(len(methods), 1)
    for ax, (title, key) in zip(axes, [("answer F1 (answerable questions)", "f1"),
                                       ("gold answer inside the reply (%)", "contains"),
                                       ("refusal F1 (off-topic + unanswerable)", "refusal_f1")]):
        for i, method in enumerate(methods):
            values = [results["methods"][method]["datasets"][d][key] or 0.0 for d in datasets]
            ax.bar([x + i * width for x in range(len(datasets))], values, width, label=method)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(datasets))], datasets)
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score (0-100)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    settings = results["settings"]
    fig.suptitle(f"doc2atom eval: {settings['model_dir']}, {settings['backend']} backend, {settings['split']} split")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> str:
    table = markdown_table(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", table + "\n")
    chart(results, out / "results.png")
    return table
