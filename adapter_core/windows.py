"""Packing token windows of several users into the rows of one memory pass.

Row u*W + j holds window j of user u, right-padded, with its positions starting at 0. A user
with fewer windows gets empty rows inserted before its last window, so that the last window
(the query, in training) always sees all of that user's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100  # label of a position without loss (PyTorch's cross-entropy default)


@dataclass
class Window:
    ids: list[int]
    labels: list[int] | None = None
    """Per position: the token to predict there (normally ids[t]) or IGNORE; None: no loss at all."""
    writes_memory: bool = True
    """False for rows that only read memory (queries): their tokens are not absorbed."""


@dataclass
class PackedWindows:
    input_ids: torch.Tensor  # (U*W, T)
    attention_mask: torch.Tensor  # (U*W, T); an empty row attends to one padding token
    sum_mask: torch.Tensor  # (U*W, T); 1 where a token is written into memory
    labels: torch.Tensor  # (U*W, T); IGNORE where there is no loss
    users: int

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> "PackedWindows":
        return PackedWindows(self.input_ids.to(device), self.attention_mask.to(device), self.sum_mask.to(device),
                             self.labels.to(device), self.users)


def pack_windows(per_user: Sequence[Sequence[Window]], pad_id: int = 0) -> PackedWindows:
    if not per_user or not all(per_user):
        raise ValueError("every user needs at least one window")
    users, windows = len(per_user), max(len(w) for w in per_user)
    length = max(1, max(len(win.ids) for w in per_user for win in w))
    ids = torch.full((users * windows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((users * windows, length), dtype=torch.long)
    writes = torch.zeros((users * windows, length), dtype=torch.long)
    labels = torch.full((users * windows, length), IGNORE, dtype=torch.long)
    for u, user_windows in enumerate(per_user):
        slots = list(range(len(user_windows) - 1)) + [windows - 1]  # last window in the last row
        for j, win in zip(slots, user_windows):
            row, n = u * windows + j, len(win.ids)
            if win.labels is not None and len(win.labels) != n:
                raise ValueError(f"window of {n} tokens has {len(win.labels)} labels")
            ids[row, :n] = torch.tensor(win.ids, dtype=torch.long)
            attention[row, :n] = 1
            writes[row, :n] = int(win.writes_memory)
            if win.labels is not None:
                labels[row, :n] = torch.tensor(win.labels, dtype=torch.long)
    attention[attention.sum(-1) == 0, 0] = 1  # attention over nothing would be NaN
    return PackedWindows(ids, attention, writes, labels, users)
