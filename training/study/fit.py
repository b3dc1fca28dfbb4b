"""Fit a document's micro-LoRAs together, the way the server will compose them.

Every training example is one study question with the teacher's answer. Each step composes, per example, the
question's gold atom with distractors — the atoms the bank's router actually picks for that question, at their
router weights, or random atoms of the document — exactly as the composer sums them (Σ w·s·B·A, one LoRA per
sample), and distils the teacher into the student without the document: KL on the teacher's top-k + CE on its
tokens. So each atom learns to carry its fact AND to stay out of the way of the others' questions.

Only the adapted last layers run: the states entering the first adapted layer do not depend on the adapters, so
they are computed once per example and cached (`vllm_doc2atom`'s targets are all in those layers).

The fit runs where the model is (`training.device`); the factors and the optimizer's state are float32 there
whatever the model's dtype (the LoRA hooks cast around them), and come back to the CPU.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vllm_doc2atom.bank_interface import Target
from vllm_doc2atom.composer import stack_factors

from .. import losses
from ..device import model_device
from ..student import LoRAHooks, output_logits, run_last_layers

logger = logging.getLogger(__name__)


@dataclass
class FitConfig:
    steps: int = 60  # optimizer steps per document, unless `passes` is set
    passes: float | None = None  # steps = passes over the document's examples (cost follows its atom count)
    batch_size: int = 12  # examples per step
    lr: float = 3e-3
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    router_share: float = 0.5  # examples composed with the router's own picks (else: gold + random atoms)
    alone_share: float = 0.2  # examples with the gold atom alone
    max_distractors: int = 2  # random compositions: gold + 1..max_distractors other atoms of the document
    weight_range: tuple[float, float] = (0.3, 1.0)  # router-weight range of random compositions
    seed: int = 0


@dataclass
class Example:
    atom: int  # gold atom (row in the document); -1: a protection example (an unrelated prompt: keep the base answer)
    prompt: list[int]  # the chat prompt of the question alone, as the server builds it
    answer: torch.Tensor  # [n] teacher tokens
    topk_ids: torch.Tensor  # [n, k] (-1 = none)
    topk_logprobs: torch.Tensor  # [n, k]
    routed: list[tuple[int, float]] = field(default_factory=list)  # the router's picks (row, weight), gold included


@dataclass
class FitResult:
    a: dict[Target, torch.Tensor]  # [n_atoms, r, in]
    b: dict[Target, torch.Tensor]  # [n_atoms, out, r]
    loss_first: float
    loss_last: float


class _Reached(Exception):
    pass


def states_entering(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states entering decoder layer `layer` [b, t, H]; the layers above (and the LM head) never run."""
    captured: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    handle = model.model.layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=ids.to(model_device(model)))
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0]


class CachedStates:
    """Hidden states entering `start_layer` for every example (right-padded), computed once, kept on the
    model's device in its dtype (float32 on the CPU)."""

    def __init__(self, model: nn.Module, examples: Sequence[Example], start_layer: int,
                 chunk: int | None = None) -> None:
        self.lengths = [len(e.prompt) + len(e.answer) for e in examples]
        width = max(self.lengths)
        if chunk is None:
            chunk = _state_chunk(model, width)
        parts = []
        with torch.no_grad():
            for i in range(0, len(examples), chunk):
                rows = [e.prompt + e.answer.tolist() for e in examples[i : i + chunk]]
                ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
                parts.append(states_entering(model, ids, start_layer))
        self.states = torch.cat(parts)  # [E, T, H]

    def batch(self, rows: Sequence[int]) -> torch.Tensor:
        width = max(self.lengths[r] for r in rows)
        return self.states[list(rows), :width]


def _state_chunk(model: nn.Module, width: int) -> int:
    """Examples per forward pass when caching states: 16 on the CPU; on a GPU what fits (one layer's
    activations at a time: residual and attention projections, the MLP's, the attention scores)."""
    from ..device import DeviceConfig

    device = model_device(model)
    if device.type != "cuda":
        return 16
    c = model.config
    per_token = c.hidden_size * 4 + c.intermediate_size * 3 + c.num_attention_heads * width
    return DeviceConfig(str(device)).rows_that_fit(16, width * per_token * model.dtype.itemsize, max_rows=256)


Factors = dict[Target, torch.Tensor]


def init_factors(targets: Sequence[Target], n_atoms: int, rank: int, shapes: dict[str, tuple[int, int]],
                 generator: torch.Generator, device: torch.device | None = None) -> tuple[Factors, Factors]:
    """LoRA's usual start: A small random, B zero, so every atom starts as a no-op. Drawn on the CPU (the same
    start on every device), float32, then moved to `device`."""
    a, b = {}, {}
    for t in targets:
        d_in, d_out = shapes[t.module]
        start = torch.randn(n_atoms, rank, d_in, generator=generator) / math.sqrt(d_in)
        a[t] = start.to(device or start.device).requires_grad_(True)
        b[t] = torch.zeros(n_atoms, d_out, rank, device=device).requires_grad_(True)
    return a, b


class CompositionSampler:
    """Draws each example's composition: (atoms [b, K], weights [b, K]) padded with weight 0."""

    def __init__(self, n_atoms: int, config: FitConfig) -> None:
        self.n_atoms, self.config = n_atoms, config
        self.rng = random.Random(config.seed)

    def draw(self, example: Example) -> list[tuple[int, float]]:
        cfg, rng = self.config, self.rng
        roll = rng.random()
        low, high = cfg.weight_range
        if example.atom < 0:  # protection: any atoms composed must leave an unrelated answer as it was
            k = rng.randint(1, min(cfg.max_distractors + 1, self.n_atoms))
            return [(i, rng.uniform(low, high)) for i in rng.sample(range(self.n_atoms), k)]
        gold = (example.atom, rng.uniform(max(low, 0.5), high))
        if roll < cfg.alone_share or self.n_atoms == 1:
            return [gold]
        if roll < cfg.alone_share + cfg.router_share and example.routed:
            picks = dict(example.routed)
            picks.setdefault(example.atom, gold[1])  # the router missed it: still teach the atom its question
            return list(picks.items())
        others = [i for i in range(self.n_atoms) if i != example.atom]
        k = rng.randint(1, min(cfg.max_distractors, len(others)))
        return [gold] + [(i, rng.uniform(low, high)) for i in rng.sample(others, k)]

    def batch(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = [self.draw(e) for e in examples]
        width = max(len(d) for d in drawn)
        rows = torch.zeros(len(drawn), width, dtype=torch.long)
        weights = torch.zeros(len(drawn), width)
        for i, picks in enumerate(drawn):
            for j, (row, w) in enumerate(picks):
                rows[i, j], weights[i, j] = row, w
        return rows, weights


def fit_document(model: nn.Module, targets: Sequence[Target], n_atoms: int, rank: int, scaling: float,
                 examples: Sequence[Example], shapes: dict[str, tuple[int, int]], config: FitConfig,
                 hooks: LoRAHooks | None = None) -> FitResult:
    """Fit n_atoms micro-LoRAs on the examples (every atom's questions, composed as served)."""
    generator = torch.Generator().manual_seed(config.seed)
    device = model_device(model)
    a, b = init_factors(targets, n_atoms, rank, shapes, generator, device)
    if not examples:
        return FitResult(_to_cpu(a), _to_cpu(b), 0.0, 0.0)
    start_layer = min(t.layer for t in targets)
    states = CachedStates(model, examples, start_layer)
    own_hooks = hooks is None
    hooks = hooks or LoRAHooks(model, targets)
    optimizer = torch.optim.Adam([*a.values(), *b.values()], lr=config.lr)
    sampler = CompositionSampler(n_atoms, config)
    batches = length_batches(states.lengths, config.batch_size, random.Random(config.seed))
    losses_seen = []
    try:
        for _ in range(fit_steps(config, len(examples))):
            rows = next(batches)
            batch = [examples[r] for r in rows]
            atoms, weights = (x.to(device) for x in sampler.batch(batch))
            factors = {t: stack_factors(a[t][atoms], b[t][atoms], weights * scaling) for t in targets}
            with hooks.active(factors):
                hidden = run_last_layers(model, states.batch(rows), start_layer)  # [b, T, H]
            sample, position = (x.to(device) for x in _answer_positions(batch))
            # [n, V]; the losses in float32 on every dtype
            logits = output_logits(model, hidden[sample, position]).float()
            answer = torch.cat([e.answer for e in batch]).to(device)
            loss = config.ce_weight * losses.answer_ce(logits, answer)
            if config.kl_weight:
                topk_ids = torch.cat([e.topk_ids for e in batch]).to(device)
                topk_logprobs = torch.cat([e.topk_logprobs for e in batch]).to(device)
                loss = loss + config.kl_weight * losses.teacher_kl(logits, topk_ids, topk_logprobs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses_seen.append(loss.item())
    finally:
        if own_hooks:
            hooks.remove()
    logger.debug("fit: loss %.3f -> %.3f over %d steps", losses_seen[0], losses_seen[-1], len(losses_seen))
    return FitResult(_to_cpu(a), _to_cpu(b), losses_seen[0], losses_seen[-1])


def _to_cpu(factors: Factors) -> Factors:
    return {t: x.detach().cpu() for t, x in factors.items()}


def fit_steps(config: FitConfig, examples: int) -> int:
    """`config.steps`, or as many steps as `config.passes` passes over the examples take."""
    if config.passes is None:
        return config.steps
    return max(1, math.ceil(config.passes * examples / config.batch_size))


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                   window: int = 4) -> Iterator[list[int]]:
    """Endless batches of example rows, each pass over the examples in random order, but every `window`
    batches' worth sorted by length before it is cut: a batch runs as long as its longest example, so padding
    costs as much as real tokens."""
    rows = list(range(len(lengths)))
    while True:
        rng.shuffle(rows)
        batches = []
        for chunk in _near_equal(rows, math.ceil(len(rows) / (batch_size * window))):
            chunk = sorted(chunk, key=lengths.__getitem__)
            batches += _near_equal(chunk, math.ceil(len(chunk) / batch_size))
        rng.shuffle(batches)
        yield from batches


def _near_equal(rows: list[int], parts: int) -> list[list[int]]:
    """`rows` cut into `parts` consecutive pieces whose sizes differ by at most one: no tiny leftover."""
    return [rows[i * len(rows) // parts : (i + 1) * len(rows) // parts] for i in range(parts)]


def _answer_positions(batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, position) of every answer token's prediction: position len(prompt) - 1 + j predicts token j."""
    samples, positions = [], []
    for i, e in enumerate(batch):
        n = len(e.answer)
        samples.append(torch.full((n,), i))
        positions.append(torch.arange(len(e.prompt) - 1, len(e.prompt) - 1 + n))
    return torch.cat(samples), torch.cat(positions)
