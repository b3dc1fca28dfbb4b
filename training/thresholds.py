"""Refusal math, with no model in sight: refusal precision/recall/F1 and the router-weight threshold that
refuses best. Checkpoint calibration, study-bank calibration and the evaluation all count refusals here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class RefusalScores:
    precision: float
    recall: float
    f1: float
    should_refuse: int  # probes (off-topic or unanswerable questions) scored
    refused: int  # replies that refused, over all questions


def refusal_scores(pairs: Iterable[tuple[bool, bool]]) -> RefusalScores:
    """(should refuse, did refuse) per question -> precision/recall/F1 of refusing, refusal being positive."""
    tp = fp = fn = positives = refused = 0
    for should, did in pairs:
        positives += should
        refused += did
        tp += should and did
        fp += did and not should
        fn += should and not did
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return RefusalScores(precision, recall, f1, positives, refused)


def refusals_at(threshold: float, answerable: list[float], refusable: list[float]) -> RefusalScores:
    """Refusal precision/recall/F1 when a question is refused for its best atom's weight below `threshold`."""
    return refusal_scores([(False, w < threshold) for w in answerable]
                          + [(True, w < threshold) for w in refusable])


def best_threshold(answerable: list[float], refusable: list[float]) -> tuple[float, float]:
    """(threshold, refusal F1): the midpoint between two consecutive top weights that refuses best."""
    scores = sorted(set(answerable) | set(refusable) | {0.0, 1.0})
    best = (-1.0, -1.0, 0.5)  # (F1, gap, threshold)
    for low, high in zip(scores, scores[1:]):
        threshold = (low + high) / 2
        best = max(best, (refusals_at(threshold, answerable, refusable).f1, high - low, threshold))
    return best[2], best[0]


def refusal_threshold(positives: list[float], negatives: list[float], max_refused: float = 0.05) -> float:
    """The threshold of best refusal F1 between answerable (positives) and off-topic (negatives) top weights,
    lowered if needed so that at most `max_refused` of the positives are refused."""
    threshold, _ = best_threshold(positives, negatives)
    floor = float(np.quantile(positives, max_refused)) if positives else threshold
    return round(min(threshold, floor), 4)
