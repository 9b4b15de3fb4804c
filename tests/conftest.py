"""Tiny randomly initialised causal LMs of each supported family, built in-process (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from adapter_core import GenerativeAdapterModel, GeneratorConfig

FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
VOCAB = 97


def tiny_causal_lm(family: str = "llama", layers: int = 3, seed: int = 0, shape: dict | None = None):
    """shape: config fields to override (hidden_size, num_attention_heads, ...)."""
    config = FAMILIES[family](**dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ) | (shape or {}))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def randomize_outputs(engine: GenerativeAdapterModel, seed: int) -> GenerativeAdapterModel:
    """Random B, so that adapters visibly change the model (an untrained, B = 0 generator would
    hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in engine.adapted.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.5)
    engine.generator_id = engine.compute_generator_id()
    return engine


def live_engine(family: str = "llama", seed: int = 0, shape: dict | None = None, **config) -> GenerativeAdapterModel:
    options = dict(rank=4, window=8) | config
    engine = GenerativeAdapterModel(tiny_causal_lm(family, seed=seed, shape=shape), GeneratorConfig(**options),
                                    f"tiny-{family}")
    return randomize_outputs(engine, seed + 1)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (258 tokens) with a chat template: any text, no download."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return byte_tokenizer()


def tiny_text_lm(tokenizer, seed: int = 0):
    """A tiny Llama for the byte tokenizer, for training, evaluation and app tests."""
    lm_config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            initializer_range=0.2)  # activations of a realistic size, unlike 0.02
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(lm_config, attn_implementation="sdpa").eval()


def tiny_text_engine(tokenizer, seed: int = 0, live: bool = False, **config) -> GenerativeAdapterModel:
    """The tiny Llama with a generator (live: with random B, see randomize_outputs)."""
    options = dict(rank=8, window=64, seed=seed) | config
    engine = GenerativeAdapterModel(tiny_text_lm(tokenizer, seed), GeneratorConfig(**options), "tiny-text", tokenizer)
    return randomize_outputs(engine, seed + 3) if live else engine


@pytest.fixture
def make_text_lm(tiny_tokenizer):
    return lambda seed=0: tiny_text_lm(tiny_tokenizer, seed)


@pytest.fixture
def make_text_engine(tiny_tokenizer):
    return lambda seed=0, **config: tiny_text_engine(tiny_tokenizer, seed, **config)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Dequantized default model, kept between runs (ignored by git) so only the first run converts it."""
    folder = Path(__file__).resolve().parents[1] / ".cache" / "model-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def make_tiny_lm():
    return tiny_causal_lm


@pytest.fixture
def make_engine():
    return live_engine


@pytest.fixture
def random_tokens():
    gen = torch.Generator().manual_seed(1234)

    def draw(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    return draw
