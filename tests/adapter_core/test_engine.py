import pytest
import torch

from adapter_core import GenerativeAdapterModel, export_peft
from adapter_core.data.conversation import prompt_ids
from adapter_core.serving.decoding import ReplyRequest, reply
from adapter_core.engine import load_engine
from adapter_core.serving.sampling import SamplingConfig, end_of_turn_ids


def test_a_given_checkpoint_is_loaded_for_a_local_model(make_engine, make_tiny_lm, monkeypatch, tmp_path):
    engine = make_engine("llama")
    engine.save_generator(tmp_path / "gen")

    class Loaded:
        model, tokenizer, model_id = make_tiny_lm("llama"), None, "tiny-llama"

    monkeypatch.setattr("adapter_core.engine.load_base_model", lambda *a, **k: Loaded)
    again = load_engine("tiny", tmp_path / "gen")
    assert isinstance(again, GenerativeAdapterModel)
    assert again.generator_id == engine.generator_id


@pytest.mark.integration
def test_default_engine_absorbs_answers_and_exports(model_cache, tmp_path):
    engine = load_engine(cache_dir=model_cache)
    state = engine.absorb(engine.empty_state(), "User: My cat is called Tobrik and I live in Quenmoor.\n" * 20)
    assert state.tokens > engine.config.window and state.windows == -(-state.tokens // engine.config.window)
    assert all(torch.isfinite(s).all() for s in state.sums.values())
    prompt = prompt_ids(engine.tokenizer, "What is the capital of France?", system=None)
    greedy = SamplingConfig.greedy(12)
    answers = [r.text for r in reply(engine, [ReplyRequest(prompt, None, greedy), ReplyRequest(prompt, state, greedy)])]
    assert all("Paris" in a for a in answers), answers
    # the same greedy reply as transformers' own generate with the adapter folded (the path before
    # adapter_core.serving.decoding existed)
    with torch.inference_mode(), engine.adapters([state]):
        out = engine.base_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                         eos_token_id=end_of_turn_ids(engine.tokenizer))
    expected = [t for t in out[0, len(prompt):].tolist() if t not in end_of_turn_ids(engine.tokenizer)]
    assert list(reply(engine, [ReplyRequest(prompt, state, greedy)])[0].tokens) == expected
    folder = export_peft(engine, state, tmp_path / "export")
    assert (folder / "adapter_model.safetensors").stat().st_size > 0


def test_the_shipped_checkpoint_is_found_for_the_default_model_only(make_engine, monkeypatch, tmp_path):
    from adapter_core import engine as engine_module
    monkeypatch.setattr(engine_module, "CHECKPOINTS", tmp_path)
    assert engine_module.default_checkpoint(None) is None  # nothing shipped yet
    make_engine("llama").save_generator(tmp_path / engine_module.DEFAULT_MODEL)
    assert engine_module.default_checkpoint(None) == tmp_path / engine_module.DEFAULT_MODEL
    assert engine_module.default_checkpoint(engine_module.DEFAULT_MODEL) == tmp_path / engine_module.DEFAULT_MODEL
    assert engine_module.default_checkpoint("some/other-model") is None
