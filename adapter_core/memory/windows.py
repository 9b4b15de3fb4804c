"""Packing token windows of several users into batch rows.

Memory pass (`pack_windows`): row u*W + j holds window j of user u, right-padded, with its
positions starting at 0. A user with fewer windows gets empty rows inserted before its last
window, so that the last window always sees all of that user's memory.

Training batch (`pack_training_batch`): the windows that write memory go through one memory
pass; the read-only windows that follow them (queries) go through a second pass with their user's
whole memory, one query per row, padded only to the longest query. Queries are short, so putting
them in the memory pass would pad each to a whole window and give each user as many rows as the
user with the most questions.
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
    write_mask: torch.Tensor  # (U*W, T); 1 where a token is written into memory
    labels: torch.Tensor  # (U*W, T); IGNORE where there is no loss
    users: int

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> "PackedWindows":
        return PackedWindows(self.input_ids.to(device), self.attention_mask.to(device), self.write_mask.to(device),
                             self.labels.to(device), self.users)


def pack_windows(per_user: Sequence[Sequence[Window]], pad_id: int = 0) -> PackedWindows:
    if not per_user or not all(per_user):
        raise ValueError("every user needs at least one window")
    users, windows = len(per_user), max(len(w) for w in per_user)
    length = max(1, max(len(win.ids) for w in per_user for win in w))
    ids = torch.full((users * windows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((users * windows, length), dtype=torch.long)
    write_mask = torch.zeros((users * windows, length), dtype=torch.long)
    labels = torch.full((users * windows, length), IGNORE, dtype=torch.long)
    for u, user_windows in enumerate(per_user):
        slots = list(range(len(user_windows) - 1)) + [windows - 1]  # last window in the last row
        for j, win in zip(slots, user_windows):
            row, n = u * windows + j, len(win.ids)
            if win.labels is not None and len(win.labels) != n:
                raise ValueError(f"window of {n} tokens has {len(win.labels)} labels")
            ids[row, :n] = torch.tensor(win.ids, dtype=torch.long)
            attention[row, :n] = 1
            write_mask[row, :n] = int(win.writes_memory)
            if win.labels is not None:
                labels[row, :n] = torch.tensor(win.labels, dtype=torch.long)
    attention[attention.sum(-1) == 0, 0] = 1  # attention over nothing would be NaN
    return PackedWindows(ids, attention, write_mask, labels, users)


@dataclass
class QueryRows:
    """Read-only windows of several users, one per row; each row reads its user's whole memory."""

    input_ids: torch.Tensor  # (Q, T)
    attention_mask: torch.Tensor  # (Q, T)
    labels: torch.Tensor  # (Q, T)
    user: torch.Tensor  # (Q,) index of the row's user in the memory pass

    def to(self, device: torch.device) -> "QueryRows":
        return QueryRows(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                         self.user.to(device))


@dataclass
class TrainingBatch:
    memory: PackedWindows
    """Windows written into memory (completion windows also carry labels)."""
    queries: QueryRows | None
    """Windows that only read the memory of all of their user's memory windows."""

    @property
    def tokens(self) -> int:
        """Real tokens in the batch (padding not counted)."""
        queries = int(self.queries.attention_mask.sum()) if self.queries is not None else 0
        return int(self.memory.write_mask.sum()) + queries

    def to(self, device: torch.device) -> "TrainingBatch":
        return TrainingBatch(self.memory.to(device), self.queries.to(device) if self.queries is not None else None)


def pack_training_batch(per_user: Sequence[Sequence[Window]], pad_id: int = 0) -> TrainingBatch:
    """Memory windows into one memory pass, the read-only windows after them into query rows."""
    memory, queries = [], []
    for u, windows in enumerate(per_user):
        first_query = next((i for i, w in enumerate(windows) if not w.writes_memory), len(windows))
        if any(w.writes_memory for w in windows[first_query:]):
            raise ValueError(f"user {u}: a window writes memory after a read-only window")
        memory.append(list(windows[:first_query]) or [Window([])])  # no history: an empty memory
        queries.extend((u, w) for w in windows[first_query:])
    packed_queries = None
    if queries:  # one query per row: a memory-pass packing with a single window per "user"
        rows = pack_windows([[w] for _, w in queries], pad_id)
        packed_queries = QueryRows(rows.input_ids, rows.attention_mask, rows.labels,
                                   torch.tensor([u for u, _ in queries]))
    return TrainingBatch(pack_windows(memory, pad_id), packed_queries)
