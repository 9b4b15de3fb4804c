"""The inference loop: replies join a running batch, compression runs in slices, failures stay alone."""

import contextlib
import threading
import time

import pytest
import torch

from adapter_core.data.conversation import prompt_ids
from adapter_core.serving.decoding import ReplyRequest, reply
from adapter_core.serving.sampling import SamplingConfig
from adapter_core.serving.scheduler import InferenceLoop, LoopStopped

GREEDY = SamplingConfig.greedy(6)


@pytest.fixture
def engine(make_engine):
    return make_engine("llama")


def test_replies_submitted_at_different_times_equal_each_alone(engine, random_tokens):
    alice = engine.absorb(engine.empty_state(), [random_tokens(20)])
    requests = [ReplyRequest(random_tokens(5 + i), alice if i % 2 else None, GREEDY) for i in range(5)]
    expected = [reply(engine, [r])[0].tokens for r in requests]
    with InferenceLoop(engine) as loop:
        streams = []
        for r in requests:
            streams.append(loop.submit(r))
            time.sleep(0.002)  # some join a batch already decoding
        assert [s.result(timeout=30).tokens for s in streams] == expected
        assert all(s.result().finish == "length" and s.result().first_token_s is not None for s in streams)


def test_streamed_text_adds_up_to_the_reply(make_text_engine, tiny_tokenizer):
    engine = make_text_engine()
    with InferenceLoop(engine) as loop:
        stream = loop.submit(ReplyRequest(prompt_ids(tiny_tokenizer, "héllo wörld"), None, SamplingConfig.greedy(30)))
        pieces = list(stream)
    result = stream.result()
    assert len(pieces) > 1 and "".join(pieces).strip() == result.text


def test_a_cancelled_reply_leaves_and_the_others_go_on(engine, random_tokens):
    long = ReplyRequest(random_tokens(6), None, SamplingConfig.greedy(200))
    other = ReplyRequest(random_tokens(4), None, SamplingConfig.greedy(40))
    expected = reply(engine, [other])[0].tokens
    with InferenceLoop(engine) as loop:
        cancelled, going_on = loop.submit(long), loop.submit(other)
        next(cancelled.token_ids())  # it has started
        cancelled.cancel()
        assert cancelled.result(timeout=30).finish == "cancelled"
        assert len(cancelled.result().tokens) < 200
        assert going_on.result(timeout=30).tokens == expected


def test_a_request_that_fails_fails_alone(engine, make_engine, random_tokens):
    stranger = make_engine("llama", seed=5)  # another generator: its states are refused
    foreign = stranger.absorb(stranger.empty_state(), [random_tokens(9)])
    good = ReplyRequest(random_tokens(5), None, GREEDY)
    with InferenceLoop(engine) as loop:
        results = loop.reply([good, ReplyRequest(random_tokens(5), foreign, GREEDY), good])
    assert [r.finish for r in results] == ["length", "failed", "length"]
    assert results[0].tokens == results[2].tokens == reply(engine, [good])[0].tokens


def keep_replying(loop, random_tokens, stop: threading.Event, replies: list | None = None) -> threading.Thread:
    """A thread that keeps one reply running until `stop` is set (so that compressions step aside);
    (request, reply) pairs go into `replies`."""
    def run():
        while not stop.is_set():
            request = ReplyRequest(random_tokens(4), None, SamplingConfig.greedy(3))
            try:
                answer = loop.submit(request).result(timeout=60)
            except LoopStopped:
                return
            if replies is not None:
                replies.append((request, answer))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@contextlib.contextmanager
def pauses_while_replying(loop, random_tokens, monkeypatch):
    """Within the block a reply keeps running (keep_replying), and each pause of the loop's
    greenlets is counted: (pauses, one bool each: were replies waiting; (request, reply) pairs)."""
    pauses, replies, stop = [], [], threading.Event()
    step_aside = loop._pause
    monkeypatch.setattr(loop, "_pause", lambda: pauses.append(bool(loop._batch.rows or loop._inbox)) or step_aside())
    replying = keep_replying(loop, random_tokens, stop, replies)
    try:
        yield pauses, replies
    finally:
        stop.set()
        replying.join(60)


def test_a_compression_that_steps_aside_between_layers_gives_the_same_state_bit_for_bit(engine, random_tokens,
                                                                                          monkeypatch):
    before = engine.absorb(engine.empty_state(), [random_tokens(11)])
    text = [random_tokens(60)]  # 8 windows of 8 tokens: 4 passes of 2 windows
    with InferenceLoop(engine, windows_per_pass=2, slice_seconds=1e-9) as loop:
        with pauses_while_replying(loop, random_tokens, monkeypatch) as (pauses, replies):
            sliced = loop.absorb(before, text)
    whole = engine.absorb(before, text, windows_per_pass=2)
    assert sum(pauses) >= 4  # it did step aside (at layer boundaries, while a reply was running)
    # and the replies decoded meanwhile saw nothing of the paused pass's memories
    assert replies and all(answer.tokens == reply(engine, [request])[0].tokens for request, answer in replies)
    assert all(torch.equal(sliced.sums[name], whole.sums[name]) for name in whole.sums)
    assert (sliced.tokens, sliced.windows) == (whole.tokens, whole.windows) == (before.tokens + 60, before.windows + 8)


def test_a_reply_does_not_wait_for_a_whole_compression(engine, random_tokens):
    done: dict[str, float] = {}
    with InferenceLoop(engine, windows_per_pass=1, slice_seconds=1e-3, steps_per_slice=2) as loop:
        def compress():
            loop.absorb(engine.empty_state(), [random_tokens(8 * 200)])  # 200 passes
            done["compression"] = time.perf_counter()

        worker = threading.Thread(target=compress)
        worker.start()
        time.sleep(0.05)  # the compression is under way
        result = loop.submit(ReplyRequest(random_tokens(5), None, SamplingConfig.greedy(4))).result(timeout=60)
        done["reply"] = time.perf_counter()
        worker.join(120)
    assert result.finish == "length" and done["reply"] < done["compression"]


def test_stopping_during_a_compression_fails_it_and_leaves_the_engine_clean(engine, random_tokens, monkeypatch):
    loop = InferenceLoop(engine, windows_per_pass=1, slice_seconds=1e-9)
    stepped_aside = threading.Event()
    step_aside = loop._pause

    def pause():
        if loop._batch.rows or loop._inbox:
            stepped_aside.set()
        step_aside()

    monkeypatch.setattr(loop, "_pause", pause)
    loop.start()
    stop = threading.Event()
    errors = []

    def compress():
        try:
            loop.absorb(engine.empty_state(), [random_tokens(8 * 20_000)])  # far longer than the test
        except LoopStopped as e:
            errors.append(e)

    worker = threading.Thread(target=compress)
    worker.start()
    replying = keep_replying(loop, random_tokens, stop)
    assert stepped_aside.wait(30)  # the compression is paused between layers at least once
    stop.set()
    loop.stop()
    worker.join(60)
    replying.join(60)
    assert len(errors) == 1
    assert engine._pass is None and all(layer.memory is None and layer.folded is None
                                        for layer in engine.adapted.values())
    assert engine.absorb(engine.empty_state(), [random_tokens(8)]).windows == 1  # the engine's lock is free


def test_one_reply_whose_token_choice_fails_ends_alone(engine, random_tokens, monkeypatch):
    """In the step where one row's choice fails, and with NaN scores in one row's draw."""
    from adapter_core.serving import sampling
    original = sampling.TokenPicker.adjust

    def picky(self, logits, reply):
        if self.sampling.max_new_tokens == 13 and len(reply) == 2:
            raise RuntimeError("bad row")
        return original(self, logits, reply)

    monkeypatch.setattr(sampling.TokenPicker, "adjust", picky)
    good = ReplyRequest(random_tokens(5), None, GREEDY)
    with InferenceLoop(engine) as loop:
        results = loop.reply([good, ReplyRequest(random_tokens(5), None, SamplingConfig.greedy(13)), good])
    assert [r.finish for r in results] == ["length", "failed", "length"]
    assert len(results[1].tokens) == 2 and results[0].tokens == results[2].tokens


def test_the_loop_survives_a_failure_of_its_own(engine, random_tokens, monkeypatch):
    with InferenceLoop(engine) as loop:
        original = loop._batch.leave
        calls = []

        def broken_once(rows):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("bug")
            return original(rows)

        monkeypatch.setattr(loop._batch, "leave", broken_once)
        first = loop.submit(ReplyRequest(random_tokens(5), None, GREEDY)).result(timeout=30)
        second = loop.submit(ReplyRequest(random_tokens(5), None, GREEDY)).result(timeout=30)
    assert first.finish == "failed" and second.finish == "length"


def test_a_stopped_loop_refuses_work_and_ends_what_was_waiting(engine, random_tokens):
    loop = InferenceLoop(engine, max_rows=1)
    with pytest.raises(LoopStopped):
        loop.submit(ReplyRequest(random_tokens(3)))
    loop.start()
    stream = loop.submit(ReplyRequest(random_tokens(3), None, SamplingConfig.greedy(100_000)))
    waiting = loop.submit(ReplyRequest(random_tokens(3), None, SamplingConfig.greedy(100_000)))
    next(stream.token_ids())
    loop.stop()
    # "stopped", not "cancelled": the reader tells its client the server is stopping (its reader did not leave)
    assert stream.result(timeout=5).finish == waiting.result(timeout=5).finish == "stopped"
    with pytest.raises(LoopStopped):
        loop.absorb(engine.empty_state(), [random_tokens(8)])


def test_a_row_whose_draw_fails_fails_alone():
    from adapter_core.serving.sampling import TokenPicker, choose_tokens

    sampled = SamplingConfig(max_new_tokens=5)
    pickers = [TokenPicker(sampled, [1], seed=0), TokenPicker(sampled, [1], seed=0), TokenPicker(GREEDY, [1])]
    scores = torch.randn(3, 50)
    scores[1] = float("nan")
    chosen = choose_tokens(pickers, scores)
    assert isinstance(chosen[0], int) and isinstance(chosen[1], Exception) and chosen[2] == int(scores[2].argmax())


# --- long prompts are prefilled in slices (attacker findings, point 2) -----------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Prefill chunks of 8 columns, so that the tiny model's prompts of ~100 tokens take many."""
    monkeypatch.setattr("adapter_core.serving.decoding.PREFILL_CHUNK_TOKENS", 8)


def test_a_prompt_prefilled_in_chunks_gives_the_reply_of_one_forward(engine, random_tokens, monkeypatch):
    alice = engine.absorb(engine.empty_state(), [random_tokens(20)])
    requests = [ReplyRequest(random_tokens(n), state, GREEDY) for n, state in ((100, alice), (37, None), (9, alice))]
    monkeypatch.setattr("adapter_core.serving.decoding.PREFILL_CHUNK_TOKENS", 10_000)
    whole = [r.tokens for r in reply(engine, requests)]
    monkeypatch.setattr("adapter_core.serving.decoding.PREFILL_CHUNK_TOKENS", 8)
    assert [r.tokens for r in reply(engine, requests)] == whole


def test_a_long_prompt_steps_aside_for_other_replies_and_gives_the_same_reply(engine, random_tokens, small_chunks,
                                                                              monkeypatch):
    alice = engine.absorb(engine.empty_state(), [random_tokens(20)])
    long = ReplyRequest(random_tokens(200), alice, GREEDY)
    expected = reply(engine, [long])[0].tokens
    with InferenceLoop(engine, slice_seconds=1e-9, long_prompt_tokens=16) as loop:
        with pauses_while_replying(loop, random_tokens, monkeypatch) as (pauses, replies):
            time.sleep(0.05)
            answer = loop.submit(long).result(timeout=60)
    assert answer.tokens == expected and answer.prompt_tokens == 200
    assert sum(pauses) >= 4  # it stepped aside while others were decoding
    # the replies decoded during its pauses saw nothing of its adapter
    assert replies and all(a.tokens == reply(engine, [r])[0].tokens for r, a in replies)


def test_a_short_reply_does_not_wait_for_a_long_prefill(engine, random_tokens, small_chunks, monkeypatch):
    first_token: dict[str, float] = {}
    with InferenceLoop(engine, slice_seconds=1e-3, long_prompt_tokens=16) as loop:
        slow = loop._pause
        monkeypatch.setattr(loop, "_pause", lambda: time.sleep(0.002) or slow())  # each layer of the long one: 2 ms+
        long = loop.submit(ReplyRequest(random_tokens(250), None, SamplingConfig.greedy(2)))
        time.sleep(0.05)  # the long prefill is under way
        short = loop.submit(ReplyRequest(random_tokens(5), None, SamplingConfig.greedy(2)))
        for name, stream in (("short", short), ("long", long)):
            next(iter(stream.token_ids()))
            first_token[name] = time.perf_counter()
        assert long.result(timeout=60).finish == "length" and short.result(timeout=60).finish == "length"
    assert first_token["short"] < first_token["long"]


def test_stopping_during_a_long_prefill_cancels_it_and_leaves_the_engine_clean(engine, random_tokens, small_chunks):
    loop = InferenceLoop(engine, slice_seconds=1e-9, long_prompt_tokens=16).start()
    stop = threading.Event()
    replying = keep_replying(loop, random_tokens, stop)
    time.sleep(0.05)
    alice = engine.absorb(engine.empty_state(), [random_tokens(20)])
    long = loop.submit(ReplyRequest(random_tokens(250), alice, GREEDY))
    deadline = time.perf_counter() + 30
    while not (loop._long_prefills and loop._long_prefills[0].runner is not None) and time.perf_counter() < deadline:
        time.sleep(0.001)
    stop.set()
    loop.stop()
    replying.join(60)
    assert long.result(timeout=10).finish == "stopped"
    assert engine._pausing is None and all(layer.memory is None and layer.folded is None
                                           for layer in engine.adapted.values())


def test_a_cancelled_long_prefill_ends_without_joining(engine, random_tokens, small_chunks):
    with InferenceLoop(engine, slice_seconds=1e-9, long_prompt_tokens=16) as loop:
        stop = threading.Event()
        replying = keep_replying(loop, random_tokens, stop)
        long = loop.submit(ReplyRequest(random_tokens(250), None, GREEDY))
        time.sleep(0.02)
        long.cancel()
        assert long.result(timeout=30).finish == "cancelled" and long.result().tokens == ()
        stop.set()
        replying.join(60)
        # the loop goes on
        assert loop.submit(ReplyRequest(random_tokens(30), None, GREEDY)).result(timeout=30).finish == "length"
