"""Character spans: find where an atom's text sits in its document, and check that it does."""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s+")


def verify_span(document: str, text: str, span: tuple[int, int]) -> bool:
    """True when document[start:end] is `text` (up to whitespace runs)."""
    start, end = span
    if not (0 <= start <= end <= len(document)):
        return False
    return _SPACE.sub(" ", document[start:end]).strip() == _SPACE.sub(" ", text).strip()


def locate(document: str, text: str, hint: int = 0) -> tuple[int, int] | None:
    """The span of `text` in `document` (whitespace-insensitive), the occurrence nearest `hint`; None if absent."""
    words = text.split()
    if not words:
        return None
    pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
    matches = list(pattern.finditer(document))
    if not matches:
        return None
    best = min(matches, key=lambda m: abs(m.start() - hint))
    return best.start(), best.end()


def repair_span(document: str, text: str, span: tuple[int, int] | None) -> tuple[int, int] | None:
    """Keep a correct span, else relocate the text near the claimed start; None when the text is not verbatim."""
    if span is not None and verify_span(document, text, span):
        return span
    return locate(document, text, hint=span[0] if span else 0)
