import contextlib
import dataclasses

import pytest
import torch

from adapter_core.data.conversation import prompt_ids
from adapter_core.serving.decoding import ReplyRequest, reply
from adapter_core.serving.sampling import (SamplingConfig, TokenPicker, chat_end_of_turn_id, end_of_turn_ids,
                                   repetition_stats, words)
from tests.conftest import byte_tokenizer, tiny_text_engine


def tokenizer_with_separate_eos():
    """The byte tokenizer, but its eos is <|endoftext|> while its template still ends turns with <|im_end|>
    (as for many base-model tokenizers): only a list of both ends a reply at the end of its turn."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    return tok


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.9), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=12.5), "max_new_tokens"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(penalize_prompt=1), "penalize_prompt"),
])
def test_invalid_settings_are_refused_with_the_field_named(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**fields)


def test_defaults_sample_at_a_low_temperature_with_a_repetition_penalty_and_are_frozen():
    config = SamplingConfig()
    assert config.do_sample and 0 < config.temperature <= 0.5 and config.top_p < 1
    assert config.repetition_penalty > 1 and config.max_new_tokens < 200
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 1.0


def test_greedy_needs_no_temperature_and_applies_no_sampling_settings():
    config = SamplingConfig.greedy(32)
    assert not config.do_sample and config.max_new_tokens == 32 and config.repetition_penalty == 1.0
    SamplingConfig(do_sample=False, temperature=0.0)  # ignored when not sampling
    assert len(TokenPicker(config, [5, 6]).processors) == 0
    assert TokenPicker(config, [5, 6])(torch.tensor([0.0, 3.0, 1.0]), []) == 1


# --- choosing tokens -------------------------------------------------------------------------------

def test_the_picker_carries_the_sampling_settings():
    config = SamplingConfig(temperature=0.3, top_p=0.8, repetition_penalty=1.15, no_repeat_ngram_size=5,
                            max_new_tokens=64)
    picker = TokenPicker(config, [5, 6, 7])
    kinds = [type(p).__name__ for p in picker.processors]  # temperature and top-p: see the nucleus test
    assert kinds == ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor"]
    assert picker.processors[0].penalty == 1.15 and picker.processors[0].prompt_ignore_length == 3
    assert picker.context == [5, 6, 7]  # the n-gram ban needs the prompt; the penalty skips it
    reply_only = TokenPicker(SamplingConfig(repetition_penalty=1.15), [5, 6, 7])
    assert reply_only.context == [] and reply_only.processors[0].prompt_ignore_length is None


def test_end_of_turn_is_the_eos_once_when_they_are_the_same_token(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tiny_tokenizer.eos_token_id == im_end
    assert chat_end_of_turn_id(tiny_tokenizer) == im_end
    assert end_of_turn_ids(tiny_tokenizer) == [im_end]


def test_end_of_turn_token_of_the_chat_template_is_added_to_a_different_eos():
    tok = tokenizer_with_separate_eos()
    eos, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == eos != im_end
    assert end_of_turn_ids(tok) == [eos, im_end]


def test_a_template_that_cannot_render_a_turn_falls_back_to_known_end_of_turn_names():
    tok = tokenizer_with_separate_eos()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no') }}"
                         "{% endif %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    assert chat_end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_without_a_chat_template_only_the_eos_ends_a_reply():
    tok = tokenizer_with_separate_eos()
    tok.chat_template = None
    assert end_of_turn_ids(tok) == [tok.eos_token_id]




@contextlib.contextmanager
def logits_set_by(engine, rule):
    """Within the block, the model's logits for the k-th chosen token (k = 0, 1, ...) are rule(k, logits)."""
    calls = []

    def hook(_module, _args, output):
        chosen = len(calls)
        calls.append(1)
        return rule(chosen, output)

    handle = engine.base_model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("config", [SamplingConfig(max_new_tokens=40), SamplingConfig.greedy(40)],
                         ids=["sampled", "greedy"])
def test_a_reply_stops_at_the_end_of_turn_token_even_when_it_is_not_the_eos(config):
    tok = tokenizer_with_separate_eos()
    engine = tiny_text_engine(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def end_at_step_5(k, logits):
        if k == 5:
            logits[..., im_end] = 1e4  # far above every other token
        return logits

    with logits_set_by(engine, end_at_step_5):
        answer = reply(engine, [ReplyRequest(prompt_ids(tok, "hello"), None, config, seed=0)])[0]
    assert len(answer.tokens) == 5 and answer.finish == "end"
    with logits_set_by(engine, end_at_step_5):  # unless the reply must be longer
        longer = dataclasses.replace(config, min_new_tokens=40)
        assert reply(engine, [ReplyRequest(prompt_ids(tok, "hello"), None, longer, seed=0)])[0].finish == "length"


def test_the_reply_penalty_spares_the_prompt_and_divides_positive_and_multiplies_negative_logits():
    picker = TokenPicker(SamplingConfig.greedy(5, repetition_penalty=2.0), prompt=[2, 3])
    scores = torch.tensor([[4.0, -4.0, 4.0, 4.0, 4.0]])
    assert picker(scores[0], []) == 0  # nothing chosen yet: the prompt's 2 and 3 are not penalized
    step = picker.processors(torch.tensor([[0, 1, 0]]), scores)  # the reply so far
    assert step.tolist() == [[2.0, -8.0, 4.0, 4.0, 4.0]]  # 0 and 1 are in the reply (0 once only)
    assert picker(scores[0], [0, 1, 0]) == 2  # 0 fell below the unused tokens; 2 and 3 of the prompt spared
    on_prompt = TokenPicker(SamplingConfig(do_sample=False, repetition_penalty=2.0, penalize_prompt=True), prompt=[2, 3])
    assert on_prompt.processors(torch.tensor([[2, 3]]), scores).tolist() == [[4.0, -4.0, 2.0, 2.0, 4.0]]


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_the_reply_penalty_breaks_a_loop_and_spares_the_prompt_tokens(tiny_tokenizer, do_sample):
    """A model that always ranks the same tokens first, in the same order, loops: logit 10 for the
    first, then 8.5, 8.49, 8.48, ... (a penalty of 1.5 takes 10 below them all)."""
    engine = tiny_text_engine(tiny_tokenizer)
    ids = prompt_ids(tiny_tokenizer, "hello")
    favourite = ids[-3]  # a token of the prompt (the byte of "t" in "assistant")
    ranked = torch.tensor([favourite] + [t for t in range(40) if t not in (favourite, tiny_tokenizer.eos_token_id)])

    def preferences(_k, logits):
        fixed = torch.full_like(logits, -100.0)
        fixed[..., ranked] = 8.5 - 0.01 * torch.arange(-1, len(ranked) - 1, dtype=logits.dtype)
        fixed[..., ranked[0]] = 10.0
        return fixed

    def answer(penalty):
        config = SamplingConfig(do_sample=do_sample, temperature=0.2, top_p=0.9, repetition_penalty=penalty,
                                max_new_tokens=12)
        with logits_set_by(engine, preferences):
            return list(reply(engine, [ReplyRequest(ids, None, config, seed=0)])[0].tokens)

    looping = answer(1.0)
    assert looping == [favourite] * 12 and repetition_stats(looping).repeated_share == pytest.approx(8 / 9)
    penalized = answer(1.5)
    assert penalized[0] == favourite  # in the prompt, yet not penalized
    # each token once used falls below all unused ones; when sampling this holds only because the
    # penalty runs before temperature and top-p (after them, top-p would have kept the favourite alone)
    assert len(set(penalized)) == 12 and repetition_stats(penalized).repeated_share == 0
    if not do_sample:
        assert penalized == ranked[:12].tolist()


# --- repetition --------------------------------------------------------------------------------

def test_words_ignore_case_and_punctuation_but_keep_contractions():
    assert words("I'm  FINE, thanks!\nYou?") == ["i'm", "fine", "thanks", "you"]


def test_text_without_repeats_scores_zero():
    stats = repetition_stats("My dog Biscuit loves running on the beach every morning.")
    assert (stats.n, stats.total, stats.distinct, stats.repeated) == (4, 7, 7, 0)
    assert stats.repeated_share == 0.0


def test_a_looping_sentence_scores_near_one():
    reply = "I am here to help you. " * 10  # 60 words, 57 4-grams, of which only 6 differ
    stats = repetition_stats(reply)
    assert (stats.total, stats.distinct) == (57, 6)
    assert stats.repeated_share == pytest.approx(51 / 57)
    assert stats.repeated_share > 0.85


def test_one_repeated_phrase_counts_only_its_repeats():
    stats = repetition_stats("the cat sat on the mat and the cat sat on the rug")
    # 4-grams: 10, of which "the cat sat on" and "cat sat on the" come twice
    assert (stats.total, stats.repeated) == (10, 2)
    assert stats.repeated_share == pytest.approx(0.2)


def test_short_texts_and_other_n_and_token_ids():
    assert repetition_stats("too short").total == 0 and repetition_stats("").repeated_share == 0.0
    assert repetition_stats("a b a b a b", n=2).repeated_share == pytest.approx(3 / 5)
    assert repetition_stats([5, 6, 7, 5, 6, 7, 5, 6, 7], n=3).repeated_share == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="n must be"):
        repetition_stats("x", n=0)


@pytest.mark.parametrize("top_p, temperature", [(0.9, 0.2), (0.5, 1.0), (0.999, 3.0), (1.0, 1.0)])
def test_the_nucleus_is_the_one_transformers_keeps_and_is_sampled_in_proportion(top_p, temperature):
    """Temperature and top-p as transformers' warpers do them (the same tokens kept), also when the
    nucleus is wider than the candidates first looked at; draws follow the kept probabilities."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3000, generator=gen) * 3
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].clone()))[0]
    expected = torch.softmax(warped, -1)
    picker = TokenPicker(SamplingConfig(temperature=temperature, top_p=top_p, repetition_penalty=1.0), [1], seed=3)
    draws = torch.tensor([picker(logits, []) for _ in range(4000)])
    kept = set(torch.nonzero(expected > 0).flatten().tolist())
    assert set(draws.tolist()) <= kept
    likeliest = int(expected.argmax())
    assert (draws == likeliest).float().mean().item() == pytest.approx(expected[likeliest].item(), abs=0.03)
