import json

import pytest
import torch

from adapter_core import ConfigError, GenerativeAdapterModel
from adapter_core.memory.checkpoint import INDEX_NAME, load_sharded, save_sharded


def test_generator_round_trip_gives_the_same_id_and_outputs(make_engine, make_tiny_lm, random_tokens, tmp_path):
    engine = make_engine("qwen2")
    engine.save_generator(tmp_path)
    again = GenerativeAdapterModel.from_checkpoint(make_tiny_lm("qwen2"), tmp_path, "tiny-qwen2")
    assert again.generator_id == engine.generator_id
    assert again.config == engine.config
    assert engine.checkpoint_meta is None and again.checkpoint_meta["generator_id"] == engine.generator_id
    history = [random_tokens(21)]
    s1 = engine.absorb(engine.empty_state(), history)
    s2 = again.absorb(again.empty_state(), history)
    ids = torch.tensor([random_tokens(6)])
    torch.testing.assert_close(engine(ids, states=[s1]).logits, again(ids, states=[s2]).logits)


def test_checkpoint_for_another_base_model_is_refused(make_engine, make_tiny_lm, tmp_path):
    make_engine("llama").save_generator(tmp_path)
    with pytest.raises(ConfigError, match="trained for base model 'tiny-llama', not 'something-else'"):
        GenerativeAdapterModel.from_checkpoint(make_tiny_lm("llama"), tmp_path, "something-else")


def test_missing_checkpoint_says_what_is_missing(make_tiny_lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no generator checkpoint"):
        GenerativeAdapterModel.from_checkpoint(make_tiny_lm("llama"), tmp_path, "tiny")


def test_shards_respect_the_size_limit_and_detect_damage(tmp_path):
    tensors = {f"w{i}": torch.randn(100, 10) for i in range(7)}  # 4,000 bytes each
    paths = save_sharded(tensors, tmp_path, max_shard_bytes=10_000)
    assert len(paths) == 4  # 2 tensors per shard
    loaded = load_sharded(tmp_path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["sha256"] = "0" * 64
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="failed its checksum"):
        load_sharded(tmp_path)


def test_a_tensor_larger_than_a_shard_is_refused(tmp_path):
    with pytest.raises(ValueError, match="larger than a shard"):
        save_sharded({"big": torch.zeros(1000)}, tmp_path, max_shard_bytes=100)
