"""Statistics over the outcomes, the pass/fail verdict, the table on stdout and the JSON results."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .common import ADAPTER_CACHE, StressConfig
from .judge import Outcome
from .mutations import Mutation
from .workload import Plan

# The lists of bad outcomes in the results, each with the label the verdict gives it.
PROBLEM_KEYS = (("server_errors", "5xx answers"), ("transport_errors", "transport errors"),
                ("unexpected_statuses", "unexpected statuses"), ("wrong_answers", "wrong answers"))


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99])
    return {"p50_s": round(float(p50), 4), "p90_s": round(float(p90), 4), "p99_s": round(float(p99), 4),
            "n": len(seconds)}


def summarize(outcomes: list[Outcome], plans: list[Plan]) -> dict[str, Any]:
    expect = {p.category: sorted(set(p.expect)) for p in plans}
    by_category: dict[str, Any] = {}
    for category in sorted({o.category for o in outcomes}, key=lambda c: (outcomes_group(outcomes, c), c)):
        rows = [o for o in outcomes if o.category == category]
        by_category[category] = {
            "group": rows[0].group, "n": len(rows), "expected_status": expect[category],
            "outcomes": dict(Counter(o.outcome for o in rows).most_common()),
            "unexpected": sum(not o.expected for o in rows), "wrong": sum(bool(o.problems) for o in rows),
            "latency": percentiles([o.latency_s for o in rows]),
        }

    def brief(o: Outcome, **more: Any) -> dict[str, Any]:
        return {"index": o.index, "category": o.category, "bank": o.bank, "endpoint": o.endpoint,
                "stream": o.stream, "status": o.status, **more}

    return {
        "by_category": by_category,
        "latency": percentiles([o.latency_s for o in outcomes]),
        "server_errors": [brief(o, body=o.body) for o in outcomes if (o.status or 0) >= 500],
        "transport_errors": [brief(o, error=o.error) for o in outcomes if o.error],
        "unexpected_statuses": [brief(o, expected=expect[o.category], body=o.body)
                                for o in outcomes if not o.expected and o.status is not None
                                and o.status < 500],
        "wrong_answers": [brief(o, question=o.question, n=o.n, problems=o.problems, texts=o.texts,
                                provenance=o.provenance) for o in outcomes if o.problems],
    }


def outcomes_group(outcomes: list[Outcome], category: str) -> int:
    group = next(o.group for o in outcomes if o.category == category)
    return ("valid", "mutable", "invalid").index(group)


def failures(summary: dict[str, Any], folders: dict[str, Any]) -> list[str]:
    found = []
    for key, label in PROBLEM_KEYS:
        if summary[key]:
            found.append(f"{len(summary[key])} {label}")
    if len(folders["while_up"]) > folders["cache_size"]:
        found.append(f"{len(folders['while_up'])} adapter folders while up (cache {folders['cache_size']})")
    if folders["after_stop"]:
        found.append(f"{len(folders['after_stop'])} adapter folders left after shutdown")
    return found


def build_results(config: StressConfig, plans: list[Plan], outcomes: list[Outcome], mutations: list[Mutation],
                  wall: float, while_up: list[str], settle_s: float, after_stop: list[str],
                  server_log: dict[str, Any]) -> dict[str, Any]:
    """Everything the JSON holds, the verdict (`failures`) last."""
    results: dict[str, Any] = {
        "config": config.summary(),
        "wall_s": round(wall, 2), "requests_per_s": round(len(outcomes) / wall, 3),
        **summarize(outcomes, plans),
        "mutations": [asdict(m) for m in mutations],
        "adapter_folders": {"cache_size": ADAPTER_CACHE, "while_up": while_up, "settle_s": settle_s,
                            "after_stop": after_stop},
        "server_log": server_log,
    }
    results["failures"] = failures(results, results["adapter_folders"])
    return results


def print_report(results: dict[str, Any]) -> None:
    print(f"\n{'category':<24} {'group':<8} {'n':>5} {'expect':>11} {'unexp':>5} {'wrong':>5} "
          f"{'p50 s':>7} {'p90 s':>7} {'p99 s':>7}  outcomes")
    for category, row in results["by_category"].items():
        lat = row["latency"]
        expect = ",".join(map(str, row["expected_status"]))
        outcomes = " ".join(f"{k}:{v}" for k, v in row["outcomes"].items())
        print(f"{category:<24} {row['group']:<8} {row['n']:>5} {expect:>11} {row['unexpected']:>5} "
              f"{row['wrong']:>5} {lat['p50_s']:>7.3f} {lat['p90_s']:>7.3f} {lat['p99_s']:>7.3f}  {outcomes}")
    lat = results["latency"]
    unexpected, wrong = len(results["unexpected_statuses"]), len(results["wrong_answers"])
    print(f"{'all':<24} {'':<8} {lat['n']:>5} {'':>11} {unexpected:>5} {wrong:>5} "
          f"{lat['p50_s']:>7.3f} {lat['p90_s']:>7.3f} {lat['p99_s']:>7.3f}")
    print(f"\nwall {results['wall_s']:.1f} s, {results['requests_per_s']:.2f} requests/s, "
          f"concurrency {results['config']['concurrency']}")
    for m in results["mutations"]:
        print(f"  mutation after {m['after_requests']:>5} requests: {m['action']:<18} {m['bank']:<20} "
              f"{m['error'] or m['detail']}")
    folders = results["adapter_folders"]
    print(f"adapter folders: {len(folders['while_up'])} while up (cache {folders['cache_size']}, "
          f"settled after {folders['settle_s']} s), {len(folders['after_stop'])} after shutdown")
    print(f"server log: {results['server_log']['tracebacks']} tracebacks")
    for key, _ in PROBLEM_KEYS:
        for row in results[key][:10]:
            print(f"  {key[:-1]}: {json.dumps(row, default=str)[:400]}")
        if len(results[key]) > 10:
            print(f"  ... {len(results[key]) - 10} more {key} in the JSON")
    print("PASS" if not results["failures"] else "FAIL: " + "; ".join(results["failures"]))


def save_results(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"saved {out}")
