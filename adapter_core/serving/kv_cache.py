"""The keys and values of a decode batch, left padded, with room to grow.

Column c is the same slot of every row: a row's padding columns are masked out (the batch's
attention mask), so rows of different lengths share one tensor per layer. Unlike transformers'
DynamicCache, which concatenates every layer's whole cache with one more column at each step,
the tensors here have spare columns that a step writes into in place; they grow by a quarter
(64 to 256 columns) when full, so copies are rare. Rows join (`concat`) and leave (`select`) between steps.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

MIN_ROOM, MAX_ROOM = 64, 256
"""Spare columns given whenever the tensors are (re)allocated: a quarter of those in use, within
these bounds (a long cache is copied once per 256 steps at most, and holds at most 256 spare)."""


class KVCache:
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int):
        self.keys = keys  # per layer (B, H_kv, capacity, D)
        self.values = values
        self.width = width  # columns in use

    @classmethod
    def from_dynamic(cls, cache: DynamicCache) -> KVCache:
        """The cache of a prefill (transformers' DynamicCache), with room to grow."""
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(keys, values, keys[0].shape[2])._with_room(keys[0].shape[2])

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values in use, views (B, H_kv, width, D)."""
        return self.keys[i][:, :, :self.width], self.values[i][:, :, :self.width]

    def as_dynamic(self) -> DynamicCache:
        """A DynamicCache holding the columns in use, for a step of the transformers model."""
        return DynamicCache(ddp_cache_data=[self.layer(i) for i in range(len(self.keys))])

    def reserve(self, columns: int = 1) -> None:
        """Make sure `columns` more columns fit without reallocating during a step."""
        if self.width + columns > self.keys[0].shape[2]:
            grown = self._with_room(self.width + columns)
            self.keys, self.values = grown.keys, grown.values

    def write(self, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Layer i's keys and values (B, H_kv, D) of the token at column `width` (see reserve)."""
        self.keys[i][:, :, self.width] = keys
        self.values[i][:, :, self.width] = values

    def append_from(self, cache: DynamicCache) -> None:
        """Take the last column of a DynamicCache that a step of the transformers model grew by one."""
        self.reserve(1)
        for i, layer in enumerate(cache.layers):
            self.write(i, layer.keys[:, :, -1], layer.values[:, :, -1])
        self.width += 1

    def select(self, rows: torch.Tensor, first: int) -> KVCache:
        """The given rows, without the columns before `first` (padding in every one of them)."""
        width = self.width - first
        keys = [k[rows, :, first:self.width] for k in self.keys]
        values = [v[rows, :, first:self.width] for v in self.values]
        return KVCache(keys, values, width)._with_room(width)

    def concat(self, other: KVCache) -> KVCache:
        """This batch's rows, then the other's, both left padded to the wider one's width (each
        copied once, straight into its place)."""
        width = max(self.width, other.width)

        def joined(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            out = mine.new_zeros(self.rows + other.rows, mine.shape[1], _capacity(width), mine.shape[3])
            out[:self.rows, :, width - self.width:width] = mine[:, :, :self.width]  # zeros before: padding
            out[self.rows:, :, width - other.width:width] = theirs[:, :, :other.width]
            return out

        return KVCache([joined(a, b) for a, b in zip(self.keys, other.keys)],
                       [joined(a, b) for a, b in zip(self.values, other.values)], width)

    def _with_room(self, needed: int) -> KVCache:
        """The same columns in tensors with room for `needed` columns and some spare."""
        capacity = _capacity(needed)
        keys = [_room_for(k[:, :, :self.width], capacity) for k in self.keys]
        values = [_room_for(v[:, :, :self.width], capacity) for v in self.values]
        return KVCache(keys, values, self.width)


def _capacity(needed: int) -> int:
    """Columns to allocate for `needed`: a quarter more, within MIN_ROOM and MAX_ROOM."""
    return needed + min(max(MIN_ROOM, needed // 4), MAX_ROOM)


def _room_for(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """t (B, H, T, D) copied into the first T columns of a (B, H, capacity, D) tensor."""
    b, h, width, d = t.shape
    out = t.new_empty(b, h, capacity, d)
    out[:, :, :width] = t
    return out


def pad_left(t: torch.Tensor, width: int, axis: int = 2) -> torch.Tensor:
    """Zeros before the start of `axis` (2 of (B, H, T, D) keys, 1 of a (B, T) mask) up to `width`."""
    shape = list(t.shape)
    shape[axis] = width - t.shape[axis]
    return t if shape[axis] == 0 else torch.cat([t.new_zeros(shape), t], dim=axis)
