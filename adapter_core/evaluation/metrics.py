"""Answer metrics for short phrase answers: containment, token F1 and date match.

Containment and token F1 compare content words: normalised text (SQuAD-style: lower case, no
punctuation, no articles, NFKC) without English function words, on both sides, so that "She
went to a support group" contains the gold "the support group" and F1 does not reward "is",
"to" and "her". Negations stay: they can be the whole answer; so do "may" (the month: "May 2023"
is not "June 2023") and "before" and "after" (the week before a date is not the week after). A
gold answer made only of function words ("he", "the same") is compared with them kept. Date match:
adapter_core.evaluation.dates.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})

STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves what which who whom whose this that
these those am is are was were be been being have has had having do does did doing will would shall
should can could might must a an the and but if or because as until while of at by for with
about against between into through during above below to from up down in out on off
over under again further then once here there when where why how all any both each few more most
other some such only own same so than too very just also s t d ll m re ve
""".split())
"""English function words (pronouns, auxiliaries, prepositions, conjunctions, what is left of
contractions), without negations ("no", "not", "nor", "never"), which can be an answer, nor "may"
(a month), "before" and "after" (which order dates)."""


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _words(prediction: str, gold: str) -> tuple[list[str], list[str]]:
    """The words compared: content words of both, or all words of both when the gold has none."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    content = [w for w in ref if w not in STOP_WORDS]
    if not content:
        return pred, ref
    return [w for w in pred if w not in STOP_WORDS], content


def contains_answer(prediction: str, golds: Sequence[str]) -> bool:
    """True when a gold answer's words appear in the prediction's, in order and adjacent."""
    for gold in golds:
        pred, ref = _words(prediction, gold)
        if ref and f" {' '.join(ref)} " in f" {' '.join(pred)} ":
            return True
    return False


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best F1 over the golds between bags of words."""
    best = 0.0
    for gold in golds:
        pred, ref = _words(prediction, gold)
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
