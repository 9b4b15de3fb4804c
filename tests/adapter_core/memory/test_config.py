import pytest

from adapter_core import ConfigError, GenerativeAdapterModel, GeneratorConfig


@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(normalization="qr"), "normalization must be one of"),
    (dict(window=0), "window must be a positive"),
    (dict(target_modules=()), "target_modules must be a non-empty"),
    (dict(target_modules=("o_proj", "o_proj")), "duplicates"),
    (dict(dtype="float8"), "dtype must be one of"),
    (dict(polar_steps=0), "polar_steps"),
    (dict(layers=()), "layers must be None or a non-empty"),
])
def test_invalid_values_are_refused_with_a_clear_message(bad, message):
    with pytest.raises(ConfigError, match=message):
        GeneratorConfig(**bad)


@pytest.mark.parametrize("bad, message", [
    (dict(target_modules=("no_such_proj",)), "'no_such_proj' not found in decoder layer 0; its linear layers are"),
    (dict(target_modules=("proj",)), "not found"),  # a suffix must match a whole name component
    (dict(layers=(0, 7)), r"layers \[7\] out of range: the base model has 3 decoder layers"),
    (dict(layers=(0, -3)), "name the same layer twice"),
    (dict(rank=33), "rank 33 exceeds the size of 'o_proj'"),
    (dict(target_modules=("self_attn",)), "is LlamaAttention, not nn.Linear"),
])
def test_config_is_checked_against_the_base_model(make_tiny_lm, bad, message):
    with pytest.raises(ConfigError, match=message):
        GenerativeAdapterModel(make_tiny_lm("llama"), GeneratorConfig(**bad), "tiny")


def test_negative_layer_indices_count_from_the_end(make_tiny_lm):
    engine = GenerativeAdapterModel(make_tiny_lm("llama"), GeneratorConfig(rank=4, layers=(-1,)), "tiny")
    assert list(engine.adapted) == ["model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj"]


def test_dict_round_trip_and_unknown_fields():
    config = GeneratorConfig(rank=8, layers=(1, 2), normalization="svd")
    assert GeneratorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown GeneratorConfig fields: \\['colour'\\]"):
        GeneratorConfig.from_dict(config.to_dict() | {"colour": "red"})
