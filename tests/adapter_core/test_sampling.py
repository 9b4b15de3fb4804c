import dataclasses

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from adapter_core.conversation import prompt_ids
from adapter_core.sampling import (ReplyRepetitionPenalty, SamplingConfig, chat_end_of_turn_id, end_of_turn_ids,
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


def test_greedy_needs_no_temperature_and_passes_no_sampling_settings(tiny_tokenizer):
    config = SamplingConfig.greedy(32)
    assert not config.do_sample and config.max_new_tokens == 32 and config.repetition_penalty == 1.0
    SamplingConfig(do_sample=False, temperature=0.0)  # ignored when not sampling
    kwargs = config.generate_kwargs(tiny_tokenizer)
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 32
    assert not {"temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size"} & set(kwargs)


# --- generate kwargs ---------------------------------------------------------------------------

def test_generate_kwargs_carry_the_sampling_settings(tiny_tokenizer):
    config = SamplingConfig(temperature=0.3, top_p=0.8, repetition_penalty=1.15, no_repeat_ngram_size=5,
                            max_new_tokens=64)
    kwargs = config.generate_kwargs(tiny_tokenizer)
    processors = kwargs.pop("logits_processor")
    assert kwargs == dict(max_new_tokens=64, do_sample=True, temperature=0.3, top_p=0.8, no_repeat_ngram_size=5,
                          pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=[tiny_tokenizer.eos_token_id])
    assert [type(p) for p in processors] == [ReplyRepetitionPenalty] and processors[0].penalty == 1.15
    assert config.generate_kwargs(tiny_tokenizer)["logits_processor"][0] is not processors[0]  # fresh per call
    on_prompt = dataclasses.replace(config, penalize_prompt=True).generate_kwargs(tiny_tokenizer)
    assert on_prompt["repetition_penalty"] == 1.15 and "logits_processor" not in on_prompt


def test_end_of_turn_is_the_eos_once_when_they_are_the_same_token(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tiny_tokenizer.eos_token_id == im_end
    assert chat_end_of_turn_id(tiny_tokenizer) == im_end
    assert end_of_turn_ids(tiny_tokenizer) == [im_end]


def test_end_of_turn_token_of_the_chat_template_is_added_to_a_different_eos():
    tok = tokenizer_with_separate_eos()
    eos, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == eos != im_end
    assert SamplingConfig().generate_kwargs(tok)["eos_token_id"] == [eos, im_end]


def test_a_template_that_cannot_render_a_turn_falls_back_to_known_end_of_turn_names():
    tok = tokenizer_with_separate_eos()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no') }}"
                         "{% endif %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    assert chat_end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_without_a_chat_template_only_the_eos_ends_a_reply():
    tok = tokenizer_with_separate_eos()
    tok.chat_template = None
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


class ForceAt(LogitsProcessor):
    """Only `token` may come at generated step `step` (0-based); other steps are left alone."""

    def __init__(self, prompt_length: int, step: int, token: int):
        self.at, self.token = prompt_length + step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.token] = 0.0
            return forced
        return scores


@pytest.mark.parametrize("config", [SamplingConfig(max_new_tokens=40), SamplingConfig.greedy(40)],
                         ids=["sampled", "greedy"])
def test_generation_stops_at_the_end_of_turn_token_even_when_it_is_not_the_eos(config):
    tok = tokenizer_with_separate_eos()
    engine = tiny_text_engine(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = prompt_ids(tok, "hello")
    kwargs = config.generate_kwargs(tok)

    def run(**overrides):
        torch.manual_seed(0)
        given = kwargs | overrides
        processors = LogitsProcessorList([*given.pop("logits_processor", []), ForceAt(len(ids), 5, im_end)])
        with torch.inference_mode():
            out = engine.generate(torch.tensor([ids]), logits_processor=processors, **given)
        return out[0, len(ids):].tolist()

    new = run()
    assert len(new) == 6 and new[-1] == im_end
    # the tokenizer's eos alone (the app's old settings) would have run on past the end of the turn
    assert len(run(eos_token_id=tok.eos_token_id, min_new_tokens=40)) == 40


def test_the_reply_penalty_spares_the_prompt_and_divides_positive_and_multiplies_negative_logits():
    penalty = ReplyRepetitionPenalty(2.0)
    scores = torch.tensor([[4.0, -4.0, 4.0, 4.0, 4.0]])
    prompt = torch.tensor([[2, 3]])
    assert torch.equal(penalty(prompt, scores), scores)  # first step: only the prompt, nothing penalized
    step = penalty(torch.tensor([[2, 3, 0, 1, 0]]), scores)
    assert step.tolist() == [[2.0, -8.0, 4.0, 4.0, 4.0]]  # 0 and 1 are in the reply (0 once only); 2, 3 spared
    again = penalty(torch.tensor([[4, 0]]), scores)  # a new prompt: a new generation, nothing penalized yet
    assert torch.equal(again, scores) and penalty.prompt.tolist() == [[4, 0]]
    with pytest.raises(ValueError, match="penalty"):
        ReplyRepetitionPenalty(0.5)


class Preferences(LogitsProcessor):
    """Stands in for a model that always ranks the same tokens first, in the same order (so loops):
    logit 10 for the first, then 8.5, 8.49, 8.48, ... (a penalty of 1.5 takes 10 below them all)."""

    def __init__(self, ranked: list[int]):
        self.ranked = torch.tensor(ranked)

    def __call__(self, input_ids, scores):
        fixed = torch.full_like(scores, -100.0)
        fixed[:, self.ranked] = 8.5 - 0.01 * torch.arange(-1, len(self.ranked) - 1, dtype=scores.dtype)
        fixed[:, self.ranked[0]] = 10.0
        return fixed


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_the_reply_penalty_breaks_a_loop_and_spares_the_prompt_tokens(tiny_tokenizer, do_sample):
    engine = tiny_text_engine(tiny_tokenizer)
    ids = prompt_ids(tiny_tokenizer, "hello")
    favourite = ids[-3]  # a token of the prompt (the byte of "t" in "assistant")
    ranked = [favourite] + [t for t in range(40) if t not in (favourite, tiny_tokenizer.eos_token_id)]

    def reply(config):
        kwargs = config.generate_kwargs(tiny_tokenizer)
        processors = LogitsProcessorList([Preferences(ranked), *kwargs.pop("logits_processor", [])])
        torch.manual_seed(0)
        with torch.inference_mode():
            out = engine.generate(torch.tensor([ids]), logits_processor=processors, **kwargs)
        return out[0, len(ids):].tolist()

    def config(penalty):
        return SamplingConfig(do_sample=do_sample, temperature=0.2, top_p=0.9, repetition_penalty=penalty,
                              max_new_tokens=12)

    looping = reply(config(1.0))
    assert looping == [favourite] * 12 and repetition_stats(looping).repeated_share == pytest.approx(8 / 9)
    penalized = reply(config(1.5))
    assert penalized[0] == favourite  # in the prompt, yet not penalized
    # each token once used falls below all unused ones; when sampling this holds only because the
    # penalty runs before temperature and top-p (after them, top-p would have kept the favourite alone)
    assert len(set(penalized)) == 12 and repetition_stats(penalized).repeated_share == 0
    if not do_sample:
        assert penalized == ranked[:12]


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
