"""Serving settings: the `--doc2atom-*` flags of `vllm serve`, read back from vLLM's parsed args."""

from __future__ import annotations

import os
import tempfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REFUSAL = "I can't answer that from the documents in this atom bank."
EVIDENCE_MODES = ("off", "with-adapter", "only")
# a request's `atom_evidence` -> the mode
REQUEST_EVIDENCE = {False: "off", True: "with-adapter", "only": "only"}


def default_adapter_dir() -> str:
    # tmpfs when there is one: adapters are small, written per new selection, and read back by the engine.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "doc2atom-adapters")


@dataclass
class ServeSettings:
    bank_root: Path
    top_k: int = 8
    threshold: float | None = None  # None: each bank's calibrated threshold (its checkpoint's), else 0.5
    stage2: bool = False
    on_refusal: str = "refuse"  # "refuse": answer refusal_message without a model call; "base": base model answers
    refusal_message: str = DEFAULT_REFUSAL
    adapter_dir: Path = Path(default_adapter_dir())
    adapter_cache_size: int = 64  # composed adapters kept registered when no request uses them
    max_lora_rank: int = 64
    api_keys: tuple[str, ...] = ()
    shared_engine: bool = False  # several API server processes share one engine
    # the routed atoms' text before the question (per request: atom_evidence): "off", "with-adapter" (text and
    # composed adapter) or "only" (text, no adapter: the base model reads the atoms)
    evidence: str = "off"

    @classmethod
    def from_args(cls, args: Namespace) -> ServeSettings:
        keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY", "")]) if k]
        return cls(
            bank_root=Path(args.doc2atom_bank_root).expanduser(),
            top_k=args.doc2atom_top_k,
            threshold=args.doc2atom_threshold,
            stage2=args.doc2atom_stage2,
            on_refusal=args.doc2atom_on_refusal,
            refusal_message=args.doc2atom_refusal_message,
            adapter_dir=Path(args.doc2atom_adapter_dir) / str(os.getpid()),
            adapter_cache_size=args.doc2atom_adapter_cache,
            max_lora_rank=int(getattr(args, "max_lora_rank", None) or 16),
            api_keys=tuple(keys),
            shared_engine=(getattr(args, "api_server_count", None) or 1) > 1,
            evidence=getattr(args, "doc2atom_evidence", None) or "off",
        )
