"""Answer metrics: normalised containment (accuracy) and token F1, as in SQuAD-style QA."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_answer(prediction: str, golds: Sequence[str]) -> bool:
    """True when a normalised gold answer appears in the prediction as whole words."""
    padded = f" {normalize_answer(prediction)} "
    return any(g and f" {g} " in padded for g in map(normalize_answer, golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best F1 over the golds between bags of normalised words."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
