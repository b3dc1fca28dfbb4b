"""Answer metrics: SQuAD-normalised token F1 / exact match, containment, and spotting a refusal in a reply
(refusal precision/recall/F1 are counted in `training.thresholds`)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# Phrases with which a model declines; the served doc2atom refusal says "I can't answer that ...".
_REFUSAL = re.compile(r"\b(i can'?t answer|i cannot answer|i don'?t know|i do not know|not (mentioned|stated|"
                      r"provided|specified|given) in|no information|does not (say|mention|contain|provide)|"
                      r"doesn'?t (say|mention|contain|provide)|unable to answer|not able to answer)", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """The SQuAD evaluation script's normalisation: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def contains(prediction: str, gold: str) -> float:
    """1 when the normalised gold answer appears inside the normalised reply (verbose but right answers)."""
    ref = normalize_answer(gold)
    return float(bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} ")


def best_over(metric, prediction: str, golds: Sequence[str]) -> float:
    return max((metric(prediction, g) for g in golds), default=0.0)


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))
