"""Batched generation with transformers that reads a shared prefix once.

Self-study asks the base model many short things about ONE document (questions about each atom, answers with
the document in context). Every prompt starts with the same document, so its key/value cache is computed once
and repeated over the batch; each row then adds its own suffix (left-padded, so all rows end together) and is
decoded step by step. On a 2-core CPU this makes the teacher ~5x cheaper than running each full prompt.

It runs where the model is (`training.device`); what it returns is on the CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..device import DeviceConfig, model_device


@dataclass
class Generated:
    tokens: list[int]  # generated ids, up to (not including) the end-of-turn token
    topk_ids: torch.Tensor  # [n, k] int64 ([n, 0] when top_k = 0)
    topk_logprobs: torch.Tensor  # [n, k] float32
    stopped: bool = False  # ended with an end-of-turn token (not cut at max_new_tokens)

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.tokens, skip_special_tokens=True).strip()


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids vLLM's chat endpoint builds for these messages (generation prompt added)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def split_common_prefix(prompts: Sequence[list[int]]) -> tuple[list[int], list[list[int]]]:
    """(longest prefix shared by every prompt, the rest of each); each rest keeps at least one token."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return list(prompts[0][:n]), [list(p[n:]) for p in prompts]


_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def stop_ids(tokenizer) -> set[int]:
    found = {tokenizer.convert_tokens_to_ids(n) for n in _END_OF_TURN if n in tokenizer.get_vocab()}
    return {t for t in found | {tokenizer.eos_token_id} if isinstance(t, int) and t >= 0}


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in this model's chat template (else end of sequence)."""
    vocab = tokenizer.get_vocab()
    return next((vocab[n] for n in _END_OF_TURN if n in vocab), tokenizer.eos_token_id)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, top_k: int = 0,
             temperature: float = 0.0, seed: int = 0, batch_size: int | None = None) -> list[Generated]:
    """Greedy (temperature 0) or sampled continuations of token-id prompts, with the top-k log-probabilities
    of each step when top_k > 0. Prompts that share a prefix (the document) read it once. batch_size: prompts
    decoded together (default: 32 on the CPU, what fits in half the free memory of a GPU)."""
    if not prompts:
        return []
    device = model_device(model)
    prefix, suffixes = split_common_prefix(prompts)
    prefix_cache = (model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
                    if prefix else None)
    generator = torch.Generator(device=device).manual_seed(seed)
    if batch_size is None:
        row = _bytes_per_row(model.config, len(prefix), max(map(len, suffixes)), max_new_tokens,
                             model.dtype.itemsize)
        batch_size = DeviceConfig(str(device)).rows_that_fit(32, row)
    results: list[Generated] = []
    for start in range(0, len(suffixes), batch_size):
        results += _decode(model, tokenizer, len(prefix), prefix_cache, suffixes[start : start + batch_size],
                           max_new_tokens, top_k, temperature, generator)
    return results


def _bytes_per_row(config, prefix: int, width: int, new_tokens: int, itemsize: int) -> float:
    """A rough upper bound of one decoded row's memory: its copy of the key/value cache at full length, the
    first step's logits over every suffix position, the attention scores of one layer."""
    config = getattr(config, "text_config", config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    length = prefix + width + new_tokens
    cache = 2 * config.num_hidden_layers * kv_heads * head_dim * length
    logits = width * config.vocab_size
    return float(itemsize * (cache + logits + heads * width * length) + 4 * config.vocab_size)


def _decode(model, tokenizer, prefix_len: int, prefix_cache, suffixes: list[list[int]], max_new_tokens: int,
            top_k: int, temperature: float, generator: torch.Generator) -> list[Generated]:
    b, width = len(suffixes), max(len(s) for s in suffixes)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = generator.device
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=device)
    mask = torch.tensor([[1] * prefix_len + [0] * (width - len(s)) + [1] * len(s) for s in suffixes],
                        device=device)
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    # real tokens of a row continue the prefix's positions; pads get any position (they are masked out)
    positions = (prefix_len + torch.arange(width, device=device)[None]
                 - (width - lengths)[:, None]).clamp(min=prefix_len)
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(b)
    stops = stop_ids(tokenizer)
    tokens: list[list[int]] = [[] for _ in range(b)]
    top_ids: list[list[torch.Tensor]] = [[] for _ in range(b)]
    top_logprobs: list[list[torch.Tensor]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    stopped = [False] * b
    next_position = prefix_len + lengths
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [b, V]
        if temperature > 0:
            chosen = torch.multinomial(torch.softmax(logprobs / temperature, dim=-1), 1, generator=generator)[:, 0]
        else:
            chosen = logprobs.argmax(-1)
        top = logprobs.topk(top_k, dim=-1) if top_k > 0 else None
        # one transfer per step, not one per row (on the CPU these are the same tensors)
        picked = chosen.tolist()
        best_ids, best_logprobs = (top.indices.cpu(), top.values.cpu()) if top is not None else (None, None)
        for row in range(b):
            if done[row]:
                continue
            token = picked[row]
            if token in stops:
                done[row] = stopped[row] = True
                continue
            tokens[row].append(token)
            if top is not None:
                top_ids[row].append(best_ids[row])
                top_logprobs[row].append(best_logprobs[row])
        if bool(done.all()):
            break
        ids = chosen[:, None]
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = next_position[:, None]
        next_position = next_position + 1
    return [Generated(t, torch.stack(i) if i else torch.zeros(0, top_k, dtype=torch.long),
                      torch.stack(lp) if lp else torch.zeros(0, top_k), s)
            for t, i, lp, s in zip(tokens, top_ids, top_logprobs, stopped)]
