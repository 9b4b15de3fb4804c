"""Concurrent users through the app's services: the serialized path against the inference loop.

Both modes run the same services (app.services) on one storage; only the inference loop differs:

* serialized: one reply at a time (max_rows=1), and a compression, once started, runs to its end
  before anything else, on a thread of its own: what the app did when every engine call held one
  lock and each reply was decoded on a thread started for it;
* scheduler: replies join one running batch, and a compression steps aside for them between
  decoder layers, on the main thread (the app's inference loop as `app.py` runs it).

Replies are sampled as in the app, but all of the same length (the end of turn is held back),
so that both modes decode the same tokens' worth. The users are served by threads calling the
chat service directly, as the web page's handlers do (the page allows as many at once as the
loop decodes together).

Each mode has its own users with the same histories and the same absorbed adapters, so that
the two see identical prompts: a reply sees the turns not yet absorbed, and every run adds one.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapter_core import GenerativeAdapterModel
from adapter_core.data.conversation import Turn, history_text, prompt_ids
from adapter_core.serving.decoding import ReplyRequest, count_tokens, fit_prompt
from adapter_core.serving.sampling import SamplingConfig
from adapter_core.serving.scheduler import InferenceLoop
from app.services import Services
from app.settings import AppSettings
from storage import Storage, upgrade

from .sections import QUESTION, BenchOptions, history_turns

MODES: dict[str, Callable[[GenerativeAdapterModel], InferenceLoop]] = {
    # a slice longer than any compression: it never steps aside
    "serialized": lambda engine: InferenceLoop(engine, max_rows=1, slice_seconds=3600.0),
    "scheduler": lambda engine: InferenceLoop(engine),
}
ON_MAIN_THREAD = {"serialized": False, "scheduler": True}
"""Where each mode's decoding runs (a main thread decodes faster: see InferenceLoop.run)."""


@dataclass
class _Turn:
    first_token_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0


def concurrent_users(engine: GenerativeAdapterModel, options: BenchOptions) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        # the generator's pass: this section measures the loop beside a compression, comparable across
        # runs; the fine-tuning compressor's own cost and first tokens are bench.finetune's
        settings = AppSettings(data_dir=Path(tmp) / "data", compressor="generator", compress_every=1_000_000,
                               compress_idle_seconds=0,
                               max_new_tokens=options.concurrent_reply_tokens, messages_per_user="100000/minute",
                               actions_per_user="100000/minute", signups_per_address="100000/hour")
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        upgrade(url)
        with Storage(url, settings.data_dir) as storage:
            users = _users_with_memory(storage, engine, options)
            rows, during = [], []
            for mode, make_loop in MODES.items():
                loop = make_loop(engine)
                services = Services.create(storage, engine, loop, settings)
                # replies of one length, so that both modes decode the same number of tokens
                services.chat.sampling = dataclasses.replace(services.chat.sampling,
                                                             min_new_tokens=options.concurrent_reply_tokens)

                def measure(mode=mode, services=services) -> None:
                    _one_turn(services, users[mode]["chat"][0])  # warm-up
                    for n in options.concurrent_users:
                        turns, wall = _turns_at_once(services, users[mode]["chat"][:n])
                        rows.append(_summary(mode, n, turns, wall))
                    during.append(_during_compression(services, mode, users[mode]["chat"][0],
                                                      users[mode]["compressed"], options))

                if ON_MAIN_THREAD[mode]:
                    _with_loop_on_this_thread(loop, measure)
                else:
                    with loop:
                        measure()
                services.downloads.close()
    return {"reply_tokens": options.concurrent_reply_tokens, "history_tokens": options.concurrent_history_tokens,
            "rows": rows, "during_compression": during}


def _with_loop_on_this_thread(loop: InferenceLoop, work: Callable[[], None]) -> None:
    """Run `work` in another thread while the loop runs on this one, as the app runs it on its
    main thread (see InferenceLoop.run); errors of `work` are raised here."""
    errors: list[BaseException] = []

    def run_work() -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors.append(e)
        finally:
            loop.stop()

    loop.start(own_thread=False)
    worker = threading.Thread(target=run_work, name="bench-users")
    worker.start()
    loop.run()
    worker.join()
    if errors:
        raise errors[0]


def _users_with_memory(storage: Storage, engine: GenerativeAdapterModel, options: BenchOptions) -> dict:
    """Per mode: chat users whose history (about concurrent_history_tokens each) is absorbed, and one
    user whose compression_tokens of history wait to be absorbed. Both modes get the same texts and states."""
    tok = engine.tokenizer
    most = max(options.concurrent_users)
    histories = [history_turns(tok, options.concurrent_history_tokens, seed=200 + u) for u in range(most)]
    states = engine.absorb_many([engine.empty_state()] * most, [history_text(h) for h in histories],
                                windows_per_pass=4)
    waiting = history_turns(tok, options.compression_tokens, seed=300)
    users: dict = {}
    for mode in MODES:
        chat = []
        for u, (turns, state) in enumerate(zip(histories, states)):
            user_id = _user_with_history(storage, f"{mode}{u}", turns, tok)
            last = storage.history(user_id)[-1].id
            storage.commit_snapshot(user_id, state.to_bytes(), generator_id=engine.generator_id,
                                    base_model_id=engine.base_model_id, cursor=last, tokens_absorbed=state.tokens)
            chat.append(user_id)
        users[mode] = {"chat": chat, "compressed": _user_with_history(storage, f"{mode}-c", waiting, tok)}
    return users


def _user_with_history(storage: Storage, name: str, turns: list[Turn], tok) -> int:
    user = storage.create_user(f"bench-{name}", "a bench password 123")
    conversation = storage.start_conversation(user.id).id
    for turn in turns:
        storage.append_message(user.id, conversation, turn.role, turn.text, count_tokens(tok, turn.text))
    return user.id


def _one_turn(services: Services, user_id: int, start: float | None = None) -> _Turn:
    """One message and its whole streamed reply; times from `start` (default: now)."""
    start = time.perf_counter() if start is None else start
    turn, pieces = _Turn(), []
    for item in services.chat.reply(user_id, QUESTION):
        if isinstance(item, str):
            turn.first_token_s = turn.first_token_s or time.perf_counter() - start
            pieces.append(item)
    turn.total_s = time.perf_counter() - start
    turn.tokens = count_tokens(services.engine.tokenizer, "".join(pieces))
    return turn


def _turns_at_once(services: Services, user_ids: list[int]) -> tuple[list[_Turn], float]:
    """Every user sends at the same moment (threads released together); the turns and the wall time."""
    turns: list[_Turn | None] = [None] * len(user_ids)
    gate = threading.Barrier(len(user_ids) + 1)
    start = [0.0]

    def send(i: int) -> None:
        gate.wait()
        turns[i] = _one_turn(services, user_ids[i], start[0])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(user_ids))]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join()
    return turns, time.perf_counter() - start[0]  # type: ignore[return-value]


def _summary(mode: str, users: int, turns: list[_Turn], wall: float) -> dict:
    first = [t.first_token_s if t.first_token_s is not None else t.total_s for t in turns]
    total = [t.total_s for t in turns]
    return {"mode": mode, "users": users, "tokens": sum(t.tokens for t in turns), "seconds": wall,
            "tokens_per_s": sum(t.tokens for t in turns) / wall,
            "first_token_p50_s": float(np.percentile(first, 50)), "first_token_p95_s": float(np.percentile(first, 95)),
            "reply_p50_s": float(np.percentile(total, 50)), "reply_p95_s": float(np.percentile(total, 95))}


def _during_compression(services: Services, mode: str, chatting: int, compressed: int, options: BenchOptions) -> dict:
    """Replies sent one after another while the compression of compression_tokens runs: their first tokens."""
    done = threading.Event()
    result: dict = {}

    def compress() -> None:
        started = time.perf_counter()
        result["version"] = services.memory.compress(compressed)
        result["seconds"] = time.perf_counter() - started
        done.set()

    worker = threading.Thread(target=compress)
    worker.start()
    time.sleep(0.2)  # the compression is under way
    firsts = []
    while not done.is_set() and len(firsts) < options.replies_during_compression:
        turn = _one_turn(services, chatting)  # sent while the compression ran
        firsts.append(turn.first_token_s if turn.first_token_s is not None else turn.total_s)
    worker.join()
    return {"mode": mode, "compression_tokens": options.compression_tokens, "compression_s": result.get("seconds"),
            "first_token_s": firsts, "first_token_max_s": max(firsts) if firsts else None}


def during_long_prefill(engine: GenerativeAdapterModel, options: BenchOptions) -> dict:
    """User A sends a prompt of long_prompt_tokens; while it is prefilled, user B sends short
    messages one after another: B's first tokens, and how long A waited for its own. The loop runs
    on this thread, as in the app."""
    tok = engine.tokenizer
    long_prompt, _ = fit_prompt(tok, QUESTION, history_turns(tok, options.long_prompt_tokens, seed=300),
                                options.long_prompt_tokens)
    short_prompt = prompt_ids(tok, QUESTION)
    sampling = SamplingConfig.greedy(4)
    loop = InferenceLoop(engine)
    result: dict = {"long_prompt_tokens": len(long_prompt), "short_prompt_tokens": len(short_prompt)}

    def measure() -> None:
        loop.submit(ReplyRequest(short_prompt, None, sampling)).result()  # warm-up
        started = time.perf_counter()
        long = loop.submit(ReplyRequest(long_prompt, None, sampling))
        time.sleep(0.3)  # A's prefill is under way
        firsts = []
        while not long.result_ready() and len(firsts) < options.replies_during_compression:
            answer = loop.submit(ReplyRequest(short_prompt, None, sampling)).result()
            firsts.append(answer.first_token_s)
        a = long.result()
        result.update(first_token_s=firsts, first_token_max_s=max(firsts) if firsts else None,
                      long_first_token_s=a.first_token_s, long_total_s=time.perf_counter() - started)

    _with_loop_on_this_thread(loop, measure)
    return result
