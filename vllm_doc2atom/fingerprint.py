"""The shape identity of a base model, read from its Hugging Face `config.json` (no weights, no torch).

A bank's micro-LoRA factors only fit the model they were compiled for: the bank records this
fingerprint and loading compares it with the served model's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Where each LoRA-able linear lives inside a decoder layer (Llama, Gemma2, Qwen2/3, Mistral).
MODULE_PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass(frozen=True)
class BaseModelFingerprint:
    """Everything about a base model that decides whether LoRA factors fit it."""

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> BaseModelFingerprint:
        heads = config["num_attention_heads"]
        return cls(
            name=name or config.get("_name_or_path", "") or "",
            architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
        )

    @classmethod
    def from_model_dir(cls, path: str | Path, name: str = "") -> BaseModelFingerprint:
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        return cls.from_config(config, name=name or path.name)

    @classmethod
    def from_dict(cls, data: dict) -> BaseModelFingerprint:
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: BaseModelFingerprint) -> list[str]:
        """Shape fields that differ (the name is informational and not compared)."""
        return [
            f"{f.name}: {getattr(self, f.name)} != {getattr(other, f.name)}"
            for f in fields(self)
            if f.name != "name" and getattr(self, f.name) != getattr(other, f.name)
        ]

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target linear."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise ValueError(f"unsupported target module {module!r}; choose from {sorted(shapes)}")
        return shapes[module]


def module_path(module: str, layer: int) -> str:
    """The module's dotted path inside a `*ForCausalLM` (e.g. model.layers.3.mlp.down_proj)."""
    return f"model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"
