"""Constants, bank names and the run's configuration, shared by every stress part."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: benchmarks/stress_parts/common.py
EXAMPLE_DOCS = ROOT / "examples" / "docs"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "stress" / "stress.json"
API_KEY = "stress-key"
ADAPTER_CACHE = 2
MAX_TOKENS = 8
PROVENANCE = "x-doc2atom-provenance"
REFUSAL = "I can't answer that from the documents in this atom bank."  # the server's default refusal
IN_SCOPE = (
    "How tall is the Amber Needle lighthouse?",
    "Who wrote the Velmora Orchard Protocol?",
    "Which comet did astronomers at Brightwater discover?",
)
OFF_TOPIC = (
    "What is the best way to cook risotto?",
    "How do I change a flat bicycle tire?",
    "Which programming language should I learn first?",
)
BODY_EXCERPT = 300
REQUEST_TIMEOUT = 300.0


@dataclass(frozen=True)
class BankNames:
    healthy: tuple[str, ...] = ("docs", "team/b1", "team/b2")  # never touched
    pair: tuple[str, str] = ("team/b1", "team/b2")  # compatible: routed together
    wide: str = "wide"  # other targets and rank: cannot be routed together with `docs`
    swapped: str = "mut/swapped"  # replaced by a freshly built bank (same documents) during the run
    edited: str = "mut/edited"  # documents removed and added back during the run
    corrupt: tuple[str, str] = ("mut/corrupt-nan", "mut/corrupt-cut")  # shards damaged in place


@dataclass(frozen=True)
class StressConfig:
    """The command line of benchmarks/stress.py."""

    requests: int = 1000
    concurrency: int = 16
    seed: int = 0
    out: str = str(DEFAULT_OUT)
    model: str | None = None
    keep: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StressConfig:
        return cls(**vars(args))

    def summary(self) -> dict[str, object]:
        """The `config` section of the JSON results."""
        return {"requests": self.requests, "concurrency": self.concurrency, "seed": self.seed,
                "model": str(self.model or "tiny random llama (training.models.build_tiny_model)"),
                "adapter_cache": ADAPTER_CACHE, "max_tokens": MAX_TOKENS}


def error_text(exc: BaseException, prefix: str = "") -> str:
    """An exception as recorded in the results: type and message, cut to BODY_EXCERPT characters."""
    return f"{prefix}{type(exc).__name__}: {exc}"[:BODY_EXCERPT]
