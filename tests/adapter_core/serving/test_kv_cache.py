"""The decode batch's cache: room to grow, rows leaving, batches joining, left padded."""

import torch
from transformers import DynamicCache

from adapter_core.serving.kv_cache import MAX_ROOM, MIN_ROOM, KVCache


def filled(rows: int, width: int, layers: int = 2, start: float = 0.0) -> KVCache:
    """Keys/values whose every entry says its row and column: row * 1000 + column + start."""
    values = (torch.arange(rows)[:, None] * 1000 + torch.arange(width)[None] + start).float()  # (B, T)
    t = values[:, None, :, None].expand(rows, 2, width, 3).contiguous()  # (B, H, T, D)
    return KVCache.from_dynamic(DynamicCache(ddp_cache_data=[(t, t + 0.5) for _ in range(layers)]))


def test_a_prefill_cache_gets_room_and_a_step_writes_in_place():
    cache = filled(2, 5)
    assert cache.width == 5 and cache.keys[0].shape[2] == 5 + MIN_ROOM
    storage = cache.keys[0].data_ptr()
    cache.reserve(1)
    cache.write(1, torch.full((2, 2, 3), 7.0), torch.full((2, 2, 3), 8.0))
    cache.width += 1
    keys, values = cache.layer(1)
    assert keys.shape == (2, 2, 6, 3) and (keys[:, :, 5] == 7).all() and (values[:, :, 5] == 8).all()
    assert cache.keys[0].data_ptr() == storage  # no copy


def test_a_full_cache_grows_keeping_its_columns():
    cache = filled(1, 3)
    cache.width = cache.keys[0].shape[2]  # full (the columns after 3 are whatever was allocated)
    before = cache.layer(0)[0][:, :, :3].clone()
    cache.reserve(1)
    assert cache.keys[0].shape[2] > cache.width
    torch.testing.assert_close(cache.layer(0)[0][:, :, :3], before)


def test_leaving_rows_and_padding_columns_are_cut():
    cache = filled(3, 6).select(torch.tensor([0, 2]), first=2)
    keys, values = cache.layer(0)
    assert keys.shape == (2, 2, 4, 3)
    assert keys[1, 0, :, 0].tolist() == [2002.0, 2003.0, 2004.0, 2005.0]
    assert values[0, 0, 0, 0].item() == 2.5


def test_batches_join_left_padded_to_the_wider_one():
    joined = filled(1, 4).concat(filled(2, 2, start=0.25))
    keys, _ = joined.layer(1)
    assert keys.shape == (3, 2, 4, 3)
    assert keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert keys[2, 0, :, 0].tolist() == [0.0, 0.0, 1000.25, 1001.25]  # zeros before: the mask hides them


def test_the_transformers_model_steps_through_a_view_of_it():
    cache = filled(2, 4)
    dynamic = cache.as_dynamic()
    for layer in dynamic.layers:  # what a step of the transformers model does
        layer.update(torch.full((2, 2, 1, 3), 9.0), torch.full((2, 2, 1, 3), 9.5))
    cache.append_from(dynamic)
    keys, values = cache.layer(0)
    assert cache.width == 5 and (keys[:, :, 4] == 9).all() and (values[:, :, 4] == 9.5).all()
    assert keys[1, 0, 3, 0].item() == 1003.0


def test_the_spare_room_is_a_quarter_within_bounds():
    assert filled(1, 8).keys[0].shape[2] == 8 + MIN_ROOM
    assert filled(1, 800).keys[0].shape[2] == 800 + 200
    assert filled(1, 4000).keys[0].shape[2] == 4000 + MAX_ROOM
