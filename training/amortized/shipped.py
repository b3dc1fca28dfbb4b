"""Memory compiler checkpoints shipped in the package (training/checkpoints/), one per packaged base model."""

from __future__ import annotations

from pathlib import Path

from ..models import DEFAULT_MODEL

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def shipped_checkpoint(model: str = DEFAULT_MODEL) -> Path:
    """The trained compiler + router for a packaged base model (see its CARD.md)."""
    path = CHECKPOINTS / model
    if not (path / "checkpoint.json").is_file():
        available = sorted(p.name for p in CHECKPOINTS.glob("*") if (p / "checkpoint.json").is_file())
        raise ValueError(f"no shipped checkpoint for {model!r} (shipped: {', '.join(available) or 'none'}); "
                         "train one with `doc2atom train` and pass --checkpoint")
    return path
