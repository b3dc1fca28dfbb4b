"""The trainer's held-out check: route each validation question as inference would, then the answer loss with
the routed atoms, the gold atoms, the whole document and no adapter."""

from __future__ import annotations

import math

import torch

from .. import losses
from ..student import output_logits
from .distill import Distiller
from .prepared import QuestionItem

VALIDATION_COLUMNS = ["answer_ce_routed", "answer_ce_gold", "answer_ce_document", "answer_ce_base",
                      "fact_ce_gold", "fact_ce_base", "gold_recall", "false_refusals", "probe_refusals"]


@torch.no_grad()
def validate(distiller: Distiller, items: list[QuestionItem], k: int,
             threshold: float = 0.5) -> dict[str, float]:
    """Inference-like check on held-out documents: route each question over its document's atoms (kept:
    weight >= threshold, at most k), then answer CE with those atoms, with the gold atoms, with all the
    document's atoms at weight 1 (what the d2l_atom baseline serves), and with no adapter. fact_ce_* is the CE
    of the reply tokens that spell the gold answer only: the fact itself, without the sentence around it."""
    table, compiler = distiller.table, distiller.compiler
    answerable = [q for q in items if q.student is not None][:64]
    probes = [q for q in items if q.student is None][:64]
    routed, recalled = [], 0
    for q in answerable + probes:
        own = table.document_rows[q.document_id]
        keys = compiler.keys(table.text_embeddings[own])
        similarity = compiler.queries(q.embedding[None]) @ keys.T
        weights = torch.sigmoid(compiler.head(similarity, *table.metadata(own)))[0]
        kept = [own[i] for i in weights.argsort(descending=True)[:k].tolist() if weights[i] >= threshold]
        routed.append((q, kept, {r: weights[own.index(r)] for r in kept}))
        recalled += q.student is not None and bool(set(q.gold) & set(kept))
    refused_answerable = sum(not kept for q, kept, _ in routed if q.student is not None)
    refused_probes = sum(not kept for q, kept, _ in routed if q.student is None)
    out = {"gold_recall": recalled / max(1, len(answerable)),
           "false_refusals": refused_answerable / max(1, len(answerable)),
           "probe_refusals": refused_probes / max(1, len(probes))}
    with_atoms = [(q, kept, w) for q, kept, w in routed if q.student is not None and kept]
    if not answerable:
        return {**out, **{c: math.nan for c in VALIDATION_COLUMNS if c not in out}}
    rows = sorted({r for q in answerable for r in table.document_rows[q.document_id]})
    local = {r: i for i, r in enumerate(rows)}
    a, b, gates = compiler(table.features[rows])
    tokens = torch.cat([q.student.answer_tokens for q in answerable])
    one = gates.new_ones(())
    gold = distiller.student_logits(
        answerable, [[(local[r], one) for r in q.gold] for q in answerable], a, b, gates)
    document = distiller.student_logits(
        answerable, [[(local[r], one) for r in table.document_rows[q.document_id]] for q in answerable],
        a, b, gates)
    hidden = distiller.run_layers([q.student.hidden for q in answerable], None)
    base = output_logits(distiller.model, torch.cat([hidden[i, q.student.answer_positions]
                                                     for i, q in enumerate(answerable)]))
    out["answer_ce_gold"] = float(losses.answer_ce(gold, tokens))
    out["answer_ce_document"] = float(losses.answer_ce(document, tokens))
    out["answer_ce_base"] = float(losses.answer_ce(base, tokens))
    fact = torch.cat([q.student.fact_mask for q in answerable])
    for name, logits in (("fact_ce_gold", gold), ("fact_ce_base", base)):
        out[name] = float(losses.answer_ce(logits[fact], tokens[fact])) if fact.any() else math.nan
    if with_atoms:
        logits = distiller.student_logits(
            [q for q, _, _ in with_atoms], [[(local[r], w[r]) for r in kept] for _, kept, w in with_atoms],
            a, b, gates)
        routed_tokens = torch.cat([q.student.answer_tokens for q, _, _ in with_atoms])
        out["answer_ce_routed"] = float(losses.answer_ce(logits, routed_tokens))
    else:
        out["answer_ce_routed"] = math.nan
    return out
