"""Replies decoded in batches: each row as if alone, rows joining and leaving mid-way, prompt fitting."""

import pytest
import torch

from adapter_core.data.conversation import Turn, prompt_ids
from adapter_core.serving.decoding import DecodeBatch, ReplyRequest, count_tokens, fit_prompt, reply
from adapter_core.serving.sampling import SamplingConfig

GREEDY = SamplingConfig.greedy(7)


def greedy_without_cache(engine, request: ReplyRequest) -> list[int]:
    """The reference: every token from a full forward over prompt + reply so far (no KV cache, no batch)."""
    tokens: list[int] = []
    for _ in range(request.sampling.max_new_tokens):
        with torch.no_grad():
            logits = engine(torch.tensor([list(request.prompt) + tokens]), states=[request.state]).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.fixture
def three_requests(make_engine, random_tokens, family):
    engine = make_engine(family)
    alice = engine.absorb(engine.empty_state(), [random_tokens(24)])
    bob = engine.absorb(engine.empty_state(), [random_tokens(13)])
    requests = [ReplyRequest(random_tokens(6), alice, GREEDY), ReplyRequest(random_tokens(3), None, GREEDY),
                ReplyRequest(random_tokens(10), bob, GREEDY)]
    return engine, requests


def test_a_batch_of_replies_with_one_adapter_per_row_equals_each_alone(three_requests):
    engine, requests = three_requests
    expected = [greedy_without_cache(engine, r) for r in requests]
    assert [list(r.tokens) for r in reply(engine, requests)] == expected
    assert [list(reply(engine, [r])[0].tokens) for r in requests] == expected
    # the adapters act: Alice's reply differs from the base model's on her prompt
    assert list(reply(engine, [ReplyRequest(requests[0].prompt, None, GREEDY)])[0].tokens) != expected[0]


def test_a_paused_reply_lets_the_caller_in_before_every_step_and_answers_the_same(three_requests):
    """A compression writes its recall questions with reply(); the inference loop decodes other
    replies in its pauses (adapter_core.memory.finetune)."""
    engine, requests = three_requests
    calls = []
    paused = reply(engine, requests, pause=lambda: calls.append(1))
    assert [r.tokens for r in paused] == [r.tokens for r in reply(engine, requests)]
    assert len(calls) >= max(len(r.tokens) for r in paused)  # one before each join and step at least
    layers = len(engine.base_model.get_decoder().layers)
    prefill_only = []
    reply(engine, [ReplyRequest(r.prompt, r.state, SamplingConfig.greedy(1)) for r in requests],
          pause=lambda: prefill_only.append(1))
    assert len(prefill_only) >= layers  # and before each decoder layer of the prefill


def test_rows_that_join_and_leave_mid_reply_decode_as_if_alone(three_requests):
    engine, requests = three_requests
    expected = [greedy_without_cache(engine, r) for r in requests]
    short = ReplyRequest(requests[1].prompt, None, SamplingConfig.greedy(2))
    batch = DecodeBatch(engine)
    rows = batch.join([requests[0]])
    batch.step()
    batch.step()
    rows += batch.join([requests[1], short])  # two newcomers in one prefill, other widths
    batch.step()
    rows += batch.join([requests[2]])
    trimmed = []
    while batch.rows:
        batch.leave([r for r in batch.rows if r.finish])
        if batch.rows:
            trimmed.append(bool(batch.mask[:, 0].any()))  # no leading column of padding only
            batch.step()
    assert [r.tokens for r in rows] == [expected[0], expected[1], expected[1][:2], expected[2]]
    assert [r.finish for r in rows] == ["length"] * 4
    assert all(trimmed)  # padding columns no row needs are cut away
    assert batch.cache is None and batch.mask is None


def test_a_reply_ends_at_the_end_of_turn(make_text_engine, tiny_tokenizer):
    engine = make_text_engine()
    prompt = prompt_ids(tiny_tokenizer, "hello")
    free = reply(engine, [ReplyRequest(prompt, None, SamplingConfig.greedy(40))])[0]
    end = tiny_tokenizer.eos_token_id
    # make the end of turn the likeliest next token after the first two: the reply stops there
    first_two = list(free.tokens[:2])
    with torch.no_grad():
        engine.base_model.lm_head.weight[end] = 0
    hooked = []

    def boost(_module, _args, output):
        if len(hooked) >= 2:
            output[..., end] = 1e4
        hooked.append(1)
        return output

    handle = engine.base_model.lm_head.register_forward_hook(boost)
    try:
        ended = reply(engine, [ReplyRequest(prompt, None, SamplingConfig.greedy(40))])[0]
    finally:
        handle.remove()
    assert ended.finish == "end" and list(ended.tokens) == first_two[:2]
    assert end not in ended.tokens and ended.text == tiny_tokenizer.decode(first_two[:2]).strip()


def test_sampled_replies_follow_their_seed(make_text_engine, tiny_tokenizer):
    engine = make_text_engine()
    prompt = prompt_ids(tiny_tokenizer, "hello")
    sampling = SamplingConfig(temperature=1.5, top_p=1.0, max_new_tokens=12)
    one, again, other = reply(engine, [ReplyRequest(prompt, None, sampling, seed=s) for s in (1, 1, 2)])
    assert one.tokens == again.tokens != other.tokens


def test_fit_prompt_drops_the_earliest_turns_until_it_fits(tiny_tokenizer):
    turns = [Turn("user" if i % 2 == 0 else "assistant", f"turn number {i} " * 3) for i in range(8)]
    everything = prompt_ids(tiny_tokenizer, "the question", turns)
    ids, kept = fit_prompt(tiny_tokenizer, "the question", turns, len(everything))
    assert ids == everything and kept == turns
    ids, kept = fit_prompt(tiny_tokenizer, "the question", turns, len(everything) - 1)
    assert kept == turns[1:] and len(ids) < len(everything)
    budget = len(prompt_ids(tiny_tokenizer, "the question", turns[5:]))
    ids, kept = fit_prompt(tiny_tokenizer, "the question", turns, budget)
    assert kept == turns[5:] and ids == prompt_ids(tiny_tokenizer, "the question", turns[5:])
    ids, kept = fit_prompt(tiny_tokenizer, "the question", turns, 1)  # nothing fits: the question alone
    assert kept == [] and ids == prompt_ids(tiny_tokenizer, "the question")
    assert count_tokens(tiny_tokenizer, "héllo") == len("héllo".encode())  # byte tokenizer: one token per byte


def test_a_request_needs_a_prompt():
    with pytest.raises(ValueError, match="prompt"):
        ReplyRequest(())


def test_prompts_of_very_different_lengths_are_prefilled_apart(make_engine, random_tokens, monkeypatch):
    engine = make_engine("llama")
    batch = DecodeBatch(engine)
    widths = []
    prefill = batch._prefill
    monkeypatch.setattr(batch, "_prefill", lambda rows, pause=None: widths.append(
        [len(r.request.prompt) for r in rows]) or prefill(rows, pause))
    requests = [ReplyRequest(random_tokens(n), None, GREEDY) for n in (30, 3, 31, 4, 29)]
    rows = batch.join(requests)
    assert widths == [[3, 4], [29, 30, 31]]  # a 3-token prompt is not padded to 31
    assert [r.request for r in rows] == requests  # rows come back in the order asked
    assert [r.tokens[0] for r in rows] == [reply(engine, [q])[0].tokens[0] for q in requests]


@pytest.mark.parametrize("adapted", [False, True])
def test_prompts_with_a_long_common_start_run_it_once_and_answer_as_if_alone(make_engine, random_tokens, family,
                                                                                 adapted):
    """A compression's recall questions share their few-shot examples: that start runs once, its
    cache copied to every row, and each row's own tokens follow it (padding between)."""
    engine = make_engine(family)
    state = engine.absorb(engine.empty_state(), [random_tokens(20)]) if adapted else None
    start = random_tokens(40)
    requests = [ReplyRequest(start + random_tokens(n), state, GREEDY) for n in (2, 9, 5)]
    widths = []
    forward = engine.base_model.forward
    def counted(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    engine.base_model.forward = counted
    try:
        together = reply(engine, requests)
    finally:
        del engine.base_model.forward
    assert widths[:2] == [torch.Size([1, 40]), torch.Size([3, 9])]  # the start once, then each row's own tokens
    assert [list(r.tokens) for r in together] == [greedy_without_cache(engine, r) for r in requests]
    # another adapter per row: nothing is shared (the start's keys and values differ)
    other = engine.absorb(engine.empty_state(), [random_tokens(7)])
    mixed = [ReplyRequest(r.prompt, other if i == 1 else r.state, GREEDY) for i, r in enumerate(requests)]
    assert [list(r.tokens) for r in reply(engine, mixed)] == [greedy_without_cache(engine, r) for r in mixed]


def test_a_reply_ends_once_it_ends_with_a_stop_sequence(three_requests):
    engine, requests = three_requests
    full = list(reply(engine, [requests[1]])[0].tokens)  # 7 tokens, greedy
    stop = tuple(full[2:4])
    stopped = reply(engine, [ReplyRequest(requests[1].prompt, None, SamplingConfig.greedy(7, stop_sequences=((99999,), stop)))])[0]
    first = next(i for i in range(1, len(full)) if tuple(full[i - 1:i + 1]) == stop)  # its first showing
    assert list(stopped.tokens) == full[:first + 1] and stopped.finish == "end"  # the sequence stays in the reply
    with pytest.raises(ValueError, match="stop_sequences"):
        SamplingConfig.greedy(7, stop_sequences=((),))
