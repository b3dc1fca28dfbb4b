"""The settings of `doc2atom train` (a YAML/JSON file of these fields): the run, the compiler's shape, the
curriculum, and the weight of each loss term."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..inputs import InputError, read_text


@dataclass
class LossWeights:
    answer_ce: float = 1.0  # teacher's answer tokens
    teacher_kl: float = 1.0  # teacher's top-k distribution
    routing: float = 1.0  # BCE on gold/supporting vs distractor atoms (and every atom for probes)
    suppression: float = 0.05  # composed-update size on probes
    protection: float = 0.1  # KL to the base model on unrelated prompts
    gate_l1: float = 0.01
    consistency: float = 0.1  # gold alone vs gold + distractors
    conflict: float = 0.1
    confidence: float = 0.01


@dataclass
class TrainConfig:
    data: str  # a dataset built by `doc2atom data build --model ...` (it has teacher targets)
    model: str = "smollm2-135m-instruct"  # base model folder or packaged name (must be the teacher's)
    out: str = "runs/doc2atom"
    method: str = "doc2atom"  # "doc2atom" (routed atoms) or "d2l_atom" (all atoms of the document, no routing)
    modules: list[str] = field(default_factory=lambda: ["down_proj"])  # adapted linears
    adapted_layers: int = 4  # the last N layers get micro-LoRAs
    micro_rank: int = 4
    encoder_layer: int = 8  # base-model layer whose hidden states (of the atom's tokens) the compiler reads
    hidden: int = 512  # compiler trunk width
    slot_dim: int = 64  # attention size of the compiler's token-reading slots
    steps: int = 300
    batch_size: int = 8  # answerable questions per step (plus half as many probes)
    lr: float = 1e-3
    top_k: int = 4  # atoms composed per question once the curriculum has grown K
    # curriculum: this first share of steps composes gold atoms only, without the robustness terms
    gold_only_fraction: float = 0.3
    gold_token_weight: float = 4.0  # answer_ce/teacher_kl weight of the reply tokens that spell the gold answer
    eval_every: int = 50
    save_every: int = 100
    max_train_questions: int | None = None
    cache_prepared: bool = True  # keep the frozen inputs in OUT/prepared/: a --resume skips their minutes
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """The settings in a YAML/JSON file; InputError naming the file when it is missing or malformed."""
        data = _read_settings(path)
        _check_settings(path, "", data, cls)
        weights = data.get("weights") or {}
        _check_settings(path, "weights.", weights, LossWeights)
        return cls(**{**data, "weights": LossWeights(**weights)})


def _read_settings(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(read_text(path, "train config"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise InputError(f"train config {path} is not valid YAML{where} ({problem}): write one `key: value` "
                         "setting per line") from err
    if data is not None and not isinstance(data, dict):
        raise InputError(f"train config {path} is not a mapping: write one `key: value` setting per line")
    return data or {}


def _check_settings(path: str | Path, prefix: str, data: Any, cls: type) -> None:
    """Refuse unknown settings of the dataclass `cls`, and missing required ones."""
    known = [f.name for f in fields(cls)]
    if not isinstance(data, dict):
        raise InputError(f"train config {path}: {prefix.rstrip('.')} must be a mapping of {', '.join(known)}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"train config {path}: unknown settings {', '.join(prefix + k for k in unknown)} "
                         f"(known: {', '.join(known)})")
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise InputError(f"train config {path} lacks {', '.join(prefix + k for k in missing)}: add "
                         f"`{missing[0]}: ...` to it")
