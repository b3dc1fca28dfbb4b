"""One training step's objective: the trainable compiler composes micro-LoRAs into the frozen student, and
`Distiller.losses` returns every named term of losses.py for a batch (on a data-parallel rank: its share)."""

from __future__ import annotations

import torch

from vllm_doc2atom.bank_interface import Target
from vllm_doc2atom.composer import stack_factors

from .. import losses
from ..student import LoRAHooks, output_logits, run_last_layers
from .config import TrainConfig
from .memory_compiler import MemoryCompiler
from .prepared import AtomTable, QuestionItem

PROTECTED_POSITIONS = 8  # knowledge protection compares the last positions of each unrelated prompt
Selection = list[tuple[int, torch.Tensor]]  # (local atom row, scale) composed for one question
Factors = dict[Target, torch.Tensor]  # A [n, r, in] or B [n, out, r] of the batch's atoms, per target


class Distiller:
    """Holds the frozen base model (with LoRA hooks) and the trainable compiler; computes the losses."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, compiler: MemoryCompiler,
                 table: AtomTable) -> None:
        self.config, self.model, self.compiler, self.table = config, model, compiler, table
        self.targets = compiler.config.target_list()
        self.start_layer = model.config.num_hidden_layers - config.adapted_layers
        self.hooks = LoRAHooks(model, self.targets)

    def losses(self, answerable: list[QuestionItem], probes: list[QuestionItem], stage: int, k: int,
               rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """Every term for one global batch; with world > 1, this rank's share (see the note below)."""
        cfg, table = self.config, self.table
        questions = answerable + probes
        rows = sorted({r for q in questions for r in table.document_rows[q.document_id]})
        local = {r: i for i, r in enumerate(rows)}
        a, b, gates = self.compiler(table.features[rows])
        keys = self.compiler.keys(table.text_embeddings[rows])  # [n, K]
        queries = self.compiler.queries(torch.stack([q.embedding for q in questions]))  # [q, K]
        logits = self.compiler.head(queries @ keys.T, *table.metadata(rows))  # [q, n]: all batch atoms compete
        weights = torch.sigmoid(logits)
        labels = torch.zeros_like(logits)
        for i, q in enumerate(questions):
            labels[i, [local[r] for r in q.positives]] = 1.0
        out: dict[str, torch.Tensor] = {}
        if cfg.method == "doc2atom":
            out["routing"] = losses.routing_bce(logits, labels, positive_weight=5.0)
            out["conflict"] = sum((losses.conflict_exclusivity(weights[i], table.groups[rows])
                                   for i in range(len(questions))), weights.new_zeros(()))
        out["gate_l1"] = losses.gate_l1(gates)
        out["confidence"] = losses.confidence_alignment(gates, table.confidence[rows])

        # The student forwards are the expensive part: a data-parallel rank runs only its share of the
        # questions, summing and dividing by GLOBAL counts (x world, since gradients are averaged over ranks).
        selections = [self._select(q, weights[i], local, stage, k) for i, q in enumerate(answerable)]
        mine = list(range(rank, len(answerable), world))
        own = [answerable[i] for i in mine]
        tokens_total = float(_token_weights(answerable, cfg.gold_token_weight).sum()) / world
        if own:
            student_logits = self.student_logits(own, [selections[i] for i in mine], a, b, gates)
            token_weights = _token_weights(own, cfg.gold_token_weight)
            out["answer_ce"] = losses.answer_ce(
                student_logits, torch.cat([q.student.answer_tokens for q in own]), tokens_total, token_weights)
            out["teacher_kl"] = losses.teacher_kl(
                student_logits, torch.cat([q.student.topk_ids for q in own]),
                torch.cat([q.student.topk_logprobs for q in own]), tokens_total, token_weights)
        if stage >= 1:
            if cfg.method == "doc2atom" and own:
                gold_only = [[(local[r], weights[i, local[r]]) for r in answerable[i].gold] for i in mine]
                out["consistency"] = losses.symmetric_kl(
                    self.student_logits(own, gold_only, a, b, gates), student_logits,
                    sum(len(q.student.answer_tokens) for q in answerable) / world)
            if probes:
                sizes = sum(a[t].pow(2).sum((-1, -2)) * b[t].pow(2).sum((-1, -2)) * gates[:, j].pow(2)
                            for j, t in enumerate(self.targets))  # [n]
                # Relative to the batch's mean atom size: scale-free, so it cannot swamp the other terms.
                sizes = sizes / sizes.detach().mean().clamp(min=1e-12)
                offset = len(answerable)
                out["suppression"] = torch.stack([
                    losses.adapter_norm(weights[offset + i], sizes, torch.ones_like(sizes))
                    for i in range(len(probes))]).mean()
                paired = [(p, selections[i % len(selections)]) for i, p in enumerate(probes)]
                positions = sum(min(PROTECTED_POSITIONS, p.prompt_hidden.shape[0]) for p in probes)
                positions_total = positions / world
                if paired[rank::world]:
                    out["protection"] = self._protection(paired[rank::world], a, b, gates, positions_total)
        return out

    def _select(self, q: QuestionItem, weights: torch.Tensor, local: dict[int, int], stage: int,
                k: int) -> Selection:
        """(local atom row, scale) composed for one answerable question."""
        own = [local[r] for r in self.table.document_rows[q.document_id]]
        if self.config.method == "d2l_atom":
            return [(i, weights.new_ones(())) for i in own]  # the whole document, as one monolithic adapter
        gold = [local[r] for r in q.gold]
        if stage == 0:
            return [(i, weights.new_ones(())) for i in gold]
        ranked = sorted(own, key=lambda i: -weights[i].item())[:k]
        return [(i, weights[i]) for i in dict.fromkeys(gold + ranked)]

    def _compose(self, selections: list[Selection], a: Factors, b: Factors,
                 gates: torch.Tensor) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample LoRA factors, padded to the largest selection with zero scales."""
        width = max(len(s) for s in selections)
        factors = {}
        for j, target in enumerate(self.targets):
            rows = torch.tensor([[i for i, _ in s] + [0] * (width - len(s)) for s in selections])
            zero = gates.new_zeros(())
            scale = torch.stack([torch.stack([w for _, w in s] + [zero] * (width - len(s)))
                                 for s in selections])  # [b, width]
            scale = scale * gates[rows, j] * self.compiler.config.lora_scaling
            factors[target] = stack_factors(a[target][rows], b[target][rows], scale)
        return factors

    def run_layers(self, hiddens: list[torch.Tensor],
                   factors: dict[Target, tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        """The adapted last layers over cached hidden states (right-padded into one batch), with per-sample
        LoRA factors or none (the base model): final-normed hidden states [b, t, H]."""
        width = max(h.shape[0] for h in hiddens)
        batch = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[0])) for h in hiddens])
        with self.hooks.active(factors):
            return run_last_layers(self.model, batch, self.start_layer)

    def student_logits(self, answerable: list[QuestionItem], selections: list[Selection], a: Factors,
                       b: Factors, gates: torch.Tensor) -> torch.Tensor:
        """Logits at every answer position of every question: [P, V]."""
        factors = self._compose(selections, a, b, gates)
        hidden = self.run_layers([q.student.hidden for q in answerable], factors)
        picked = torch.cat([hidden[i, q.student.answer_positions] for i, q in enumerate(answerable)])
        return output_logits(self.model, picked)

    def _protection(self, paired: list[tuple[QuestionItem, Selection]], a: Factors, b: Factors,
                    gates: torch.Tensor, denominator: float) -> torch.Tensor:
        """Adapters composed for some questions must not change the model on unrelated prompts (probes)."""
        hiddens = [p.prompt_hidden for p, _ in paired]
        tail = [slice(max(0, h.shape[0] - PROTECTED_POSITIONS), h.shape[0]) for h in hiddens]
        adapted = self.run_layers(hiddens, self._compose([s for _, s in paired], a, b, gates))
        with torch.no_grad():
            base = self.run_layers(hiddens, None)
        pick = lambda h: output_logits(self.model, torch.cat([h[i, s] for i, s in enumerate(tail)]))  # noqa: E731
        return losses.logits_kl(pick(base), pick(adapted), denominator)


def _token_weights(questions: list[QuestionItem], gold_weight: float) -> torch.Tensor:
    """Loss weight of every answer token of these questions: `gold_weight` on the fact's tokens, else 1."""
    return 1.0 + (gold_weight - 1.0) * torch.cat([q.student.fact_mask for q in questions]).float()
