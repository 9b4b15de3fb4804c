"""Normalised date match for temporal questions: "7 May 2023", "May 7th, 2023" and "2023-05-07"
are the same date.

A regular expression finds the spans that look like dates (a day and a month name, a month name
and a year, an ISO date, a year from 1800 to 2099), and dateutil reads each span alone: read on
a whole answer, dateutil would take "3 friends ... May 7, 2023" for 3 May 2007. Not recognised:
all-numeric day/month orders ("7/5/2023": which is the month?), weekdays, and relative dates
("the Sunday before 25 May 2023" gives 25 May 2023).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from dateutil import parser as date_parser

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]\d\d|20\d\d)"
# Alternatives from the most to the least specific: at each position the first that fits wins.
# "May" alone is not a date ("it may be"): a month name needs a day or a year.
_DATE = re.compile(rf"""\b(?:
      {_DAY}(?:\s+of)?\s+{_MONTH}(?:,?\s+{_YEAR})?\b             # 7 May 2023, 7th of May, 2023
    | {_MONTH}\s+{_DAY}(?:,?\s+{_YEAR})?\b                       # May 7, 2023
    | {_MONTH},?\s+{_YEAR}\b                                     # May 2023
    | {_YEAR}[-/](?:1[0-2]|0?[1-9])[-/](?:[12]\d|3[01]|0?[1-9])(?!\d)   # 2023-05-07, 2023-05-07T13:56
    | (?<![\d/]){_YEAR}\b(?!/\d)                                 # 2023, not in 7/5/2023
)""", re.IGNORECASE | re.VERBOSE)

# Two different defaults: a field dateutil fills from the default was not in the span.
_DEFAULTS = (datetime(2000, 1, 1), datetime(2004, 2, 2))  # leap years both: "29 February" reads


@dataclass(frozen=True)
class PartialDate:
    """A date as far as the text says it (None: not said)."""

    year: int | None
    month: int | None
    day: int | None

    def matched_by(self, other: "PartialDate") -> bool:
        """Whether `other` says at least what this date says, the same way ("7 May 2023" matches
        "May 2023", not the other way round)."""
        return all(mine is None or mine == theirs
                   for mine, theirs in ((self.year, other.year), (self.month, other.month), (self.day, other.day)))


def dates_in(text: str) -> list[PartialDate]:
    """The dates a text mentions, in order."""
    found = []
    for span in _DATE.finditer(text):
        try:
            a, b = (date_parser.parse(span.group(0), default=d) for d in _DEFAULTS)
        except (ValueError, OverflowError):  # "31 April"
            continue
        found.append(PartialDate(*(x if x == y else None for x, y in ((a.year, b.year), (a.month, b.month),
                                                                      (a.day, b.day)))))
    return found


def date_match(prediction: str, golds: Sequence[str]) -> bool | None:
    """Whether the prediction mentions every date of a gold answer (or alias); None when no gold
    mentions a date (the question is not a temporal one)."""
    predicted = dates_in(prediction)
    dated = [d for d in (dates_in(g) for g in golds) if d]
    if not dated:
        return None
    return any(all(any(g.matched_by(p) for p in predicted) for g in gold) for gold in dated)
