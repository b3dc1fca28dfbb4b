"""The training objective's named terms. Each is a scalar that is zero when its goal is met exactly.

Position-wise terms average over positions, or, given `denominator`, sum and divide by it: data-parallel
ranks each sum their share of the positions and divide by the global count, so the ranks' terms add up
to the single-process mean exactly. The answer terms take per-position `weights` (the denominator is then
the total weight).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _reduce(values: torch.Tensor, denominator: float | None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) sum over positions / denominator; without one, / the positions' count (or total weight)."""
    if weights is not None:
        values = values * weights
    if denominator is None:
        denominator = values.numel() if weights is None else weights.sum()
    return values.sum() / denominator


def answer_ce(logits: torch.Tensor, tokens: torch.Tensor, denominator: float | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the teacher's answer tokens: logits [n, V], tokens [n], weights [n]."""
    return _reduce(F.cross_entropy(logits, tokens, reduction="none"), denominator, weights)


def teacher_kl(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
               denominator: float | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens, both renormalised on that set.
    logits [n, V], topk_ids [n, k] (-1 = none), topk_logprobs [n, k]."""
    valid = topk_ids >= 0
    teacher = torch.log_softmax(topk_logprobs.masked_fill(~valid, -torch.inf), dim=-1)
    # renormalised on the top-k set, the full vocabulary's normaliser cancels: no log-softmax over V needed
    student = torch.log_softmax(logits.gather(-1, topk_ids.clamp(min=0)).masked_fill(~valid, -torch.inf), dim=-1)
    terms = teacher.exp() * (teacher - student)
    return _reduce(terms.masked_fill(~valid, 0.0).sum(-1), denominator, weights)


def routing_bce(logits: torch.Tensor, labels: torch.Tensor, positive_weight: float = 1.0) -> torch.Tensor:
    """Router logits [n] vs labels [n] in {0, 1} (gold and supporting atoms are 1)."""
    weight = torch.where(labels > 0, positive_weight, 1.0)
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weight)


def adapter_norm(weights: torch.Tensor, a_norms: torch.Tensor, b_norms: torch.Tensor) -> torch.Tensor:
    """Irrelevant-query suppression: Σ_i w_i² ‖A_i‖² ‖B_i‖², an upper bound of the composed update's size.
    weights [n] (router weights on a probe's candidates), a_norms / b_norms [n] (squared Frobenius norms)."""
    return (weights.pow(2) * a_norms * b_norms).sum()


def logits_kl(reference: torch.Tensor, other: torch.Tensor, denominator: int | None = None) -> torch.Tensor:
    """KL(softmax(reference) || softmax(other)) averaged over positions: knowledge protection, with the base
    model's logits as reference on prompts unrelated to the composed atoms."""
    ref = torch.log_softmax(reference, dim=-1)
    return _reduce((ref.exp() * (ref - torch.log_softmax(other, dim=-1))).sum(-1), denominator)


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, denominator: int | None = None) -> torch.Tensor:
    """Composition consistency: gold atoms alone vs gold atoms plus a few distractors."""
    return 0.5 * (logits_kl(p_logits, q_logits, denominator) + logits_kl(q_logits, p_logits, denominator))


def gate_l1(gates: torch.Tensor) -> torch.Tensor:
    """Gate sparsity: gates [n, T] in (0, 1)."""
    return gates.abs().mean()


def conflict_exclusivity(weights: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Atoms of one conflict group contradict each other: their router weights should sum to at most 1.
    weights [n], groups [n] (group index, -1 = none)."""
    loss = weights.new_zeros(())
    for group in groups[groups >= 0].unique():
        loss = loss + F.relu(weights[groups == group].sum() - 1.0).pow(2)
    return loss


def confidence_alignment(gates: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """An atom's mean write gate should follow its annotation confidence: gates [n, T], confidence [n]."""
    return (gates.mean(-1) - confidence).pow(2).mean()
