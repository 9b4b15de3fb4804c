"""The four measurements. Each returns plain rows (dicts) for the JSON and the report."""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from dataclasses import dataclass

import torch

from adapter_core import GenerativeAdapterModel
from adapter_core.data.conversation import Turn, history_text, prompt_ids
from adapter_core.data.personas import TRAIN, make_conversation
from adapter_core.serving.decoding import ReplyRequest, count_tokens, reply
from adapter_core.serving.sampling import SamplingConfig
from adapter_core.memory.windows import Window, pack_windows

from .measure import PeakMemory, count_flops, interleaved_medians

QUESTION = "Can you remind me what I told you about my trip?"


@dataclass
class BenchOptions:
    lengths: tuple[int, ...] = (256, 1024, 2048, 4096, 8192)
    """History lengths (tokens) for the per-turn comparison."""
    reply_tokens: int = 32
    """Fixed reply length of a turn."""
    recent_turns: int = 2
    """Turns not yet absorbed, kept in the adapter-mode prompt (as in the app)."""
    repeats: int = 3
    """Repetitions of short measurements (the median is reported)."""
    absorbed_before: tuple[int, ...] = (0, 4096, 16384)
    """Tokens already in memory before absorbing `absorb_tokens` more."""
    absorb_tokens: int = 1024
    users: tuple[int, ...] = (1, 4, 16)
    """Batch sizes of the many-users decode test, one adapter per user."""
    decode_tokens: int = 32
    concurrent_users: tuple[int, ...] = (1, 4, 16)
    """Users sending a message at the same moment, through the app's services."""
    concurrent_reply_tokens: int = 32
    """Longest reply in the concurrent-users test (the app's max_new_tokens there)."""
    concurrent_history_tokens: int = 2048
    """History already absorbed into each of those users' adapters."""
    compression_tokens: int = 4096
    """Size of the compression that runs while replies are measured."""
    replies_during_compression: int = 5
    long_prompt_tokens: int = 7800
    """Prompt of the user whose long prefill runs while another user's replies are measured."""
    finetune_tokens: tuple[int, ...] = (1024, 2048)
    """New tokens the fine-tuning compressor absorbs from an empty adapter, timed."""
    compressions: int = 20
    """One user's compressions in turn with the fine-tuning compressor (the 1st, 5th and 20th timed)."""
    turns_per_compression: int = 4
    decode_bench_tokens: int = 128
    """Tokens decoded per user in the decode section (llama.cpp's tg128)."""
    prefill_lengths: tuple[int, ...] = (512, 2048)
    """Prompt lengths of the prefill comparison with llama.cpp (its pp512, pp2048)."""
    agreement_tokens: int = 64
    """Tokens per prompt of the lean step's agreement with the transformers path."""
    replicas_users: int = 32
    """People chatting at once through the load balancer (bench.replicas)."""
    replicas_rounds: int = 3
    """Messages each of them sends, one after the reply to the one before."""
    replicas_reply_tokens: int = 32
    """Length of every reply there (greedy, the end of turn held back)."""
    replicas_alone_replies: int = 20
    """Replies to one user chatting alone, one after another, after those (the per-reply cost)."""
    serving_users: tuple[int, ...] = (1, 4, 16)
    """Users sending at once to our server and to llama-server (bench.serving)."""
    serving_rounds: int = 3
    serving_reply_tokens: int = 64
    """Length of every reply there (greedy, the end of turn ignored)."""
    serving_history_tokens: int = 2048
    """History absorbed into each of those users' adapters (2 recent turns come on top)."""


def history_turns(tokenizer, tokens: int, seed: int = 0) -> list[Turn]:
    """The most recent turns of a synthetic conversation that fit in `tokens` tokens of history."""
    conversation = make_conversation(random.Random(seed), TRAIN, 10, int(tokens * 1.5) + 400)
    kept, total = [], 0
    for turn in reversed(conversation.turns):
        n = count_tokens(tokenizer, history_text([turn]))
        if total + n > tokens:
            break
        kept.insert(0, turn)
        total += n
    return kept


def prefill_flops(engine: GenerativeAdapterModel, ids: torch.Tensor, states) -> int:
    """FLOPs of the prefill: matmuls counted by PyTorch, attention scores and values added as
    4 * layers * T^2 * width (the counter misses attention on the CPU).

    Counted matmul FLOPs are a*T + c (c: the output layer at the last position only, as decoding
    computes it), so two short counts give them for any length without running a long prompt again.
    """
    def counted(n: int) -> int:
        return count_flops(lambda: engine(ids[:, :n], states=states, logits_to_keep=1))

    short, longer = 8, 16
    per_token = (counted(longer) - counted(short)) / (longer - short)
    fixed = counted(short) - per_token * short
    config = engine.base_model.config
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    length = ids.shape[1]
    return int(per_token * length + fixed + 4 * config.num_hidden_layers * length ** 2 * width)


def fixed_length(tokens: int) -> SamplingConfig:
    """Greedy replies of exactly `tokens` tokens, so that every case decodes the same amount."""
    return dataclasses.replace(SamplingConfig.greedy(tokens), min_new_tokens=tokens)


@torch.inference_mode()
def per_turn(engine: GenerativeAdapterModel, options: BenchOptions) -> list[dict]:
    tok = engine.tokenizer
    sampling = fixed_length(options.reply_tokens)
    reply(engine, [ReplyRequest(prompt_ids(tok, QUESTION), None, sampling)])  # warm-up
    rows = []
    for length in options.lengths:
        turns = history_turns(tok, length)
        recent = turns[-options.recent_turns:] if options.recent_turns else []
        state = engine.absorb(engine.empty_state(), history_text(turns[:len(turns) - len(recent)]))
        cases = {"full_history": ReplyRequest(prompt_ids(tok, QUESTION, turns), None, sampling),
                 "adapter": ReplyRequest(prompt_ids(tok, QUESTION, recent), state, sampling)}
        first, total, peak = {m: [] for m in cases}, {m: [] for m in cases}, dict.fromkeys(cases, 0)
        for _ in range(options.repeats):
            for mode, request in cases.items():  # interleaved: a slow phase hits both modes
                with PeakMemory(engine.device) as memory:
                    answer = reply(engine, [request])[0]
                total[mode].append(answer.total_s)
                first[mode].append(answer.first_token_s)
                peak[mode] = max(peak[mode], memory.peak)
        for mode, request in cases.items():
            ids = torch.tensor([request.prompt], device=engine.device)
            states = None if request.state is None else [request.state]
            rows.append({"history_tokens": length, "mode": mode, "prompt_tokens": len(request.prompt),
                         "time_to_first_token_s": statistics.median(first[mode]),
                         "reply_s": statistics.median(total[mode]), "peak_memory_mb": peak[mode] / 2**20,
                         "prefill_gflops": prefill_flops(engine, ids, states) / 1e9})
    return rows


@torch.inference_mode()
def compression(engine: GenerativeAdapterModel, options: BenchOptions) -> dict:
    tok = engine.tokenizer
    window = engine.config.window
    need = max(options.absorbed_before) + options.absorb_tokens * (options.repeats + 1)
    stream = tok(history_text(history_turns(tok, need + 2000, seed=1)), add_special_tokens=False)["input_ids"]
    # a long conversation, repeated if the synthetic one is shorter than needed
    stream = (stream * (need // max(1, len(stream)) + 1))[:need]

    started = time.perf_counter()
    state, done, states_at = engine.empty_state(), 0, {}
    for mark in sorted(options.absorbed_before):
        state = engine.absorb(state, [stream[done:mark]])
        done = mark
        states_at[mark] = state
    build_seconds = time.perf_counter() - started

    new = stream[done:done + options.absorb_tokens]
    windows = [[Window(new[i:i + window])] for i in range(0, len(new), window)]
    packed = pack_windows(windows, tok.pad_token_id).to(engine.device)
    cases = {f"absorb after {before}": (lambda s=s: engine.absorb(s, [new])) for before, s in states_at.items()}
    cases["plain forward"] = lambda: engine.base_model.get_decoder()(
        input_ids=packed.input_ids, attention_mask=packed.attention_mask, use_cache=False)
    medians = interleaved_medians(cases, options.repeats + 2)
    rows = [{"absorbed_before": before, "absorb_s": medians[f"absorb after {before}"]} for before in states_at]
    plain = medians["plain forward"]
    absorb_times = [r["absorb_s"] for r in rows]
    return {
        "rows": rows,
        "absorb_tokens": len(new),
        "tokens_per_s": max(options.absorbed_before) / build_seconds if build_seconds else None,
        "plain_forward_s": plain,
        "generator_overhead": statistics.median(absorb_times) / plain - 1,
        "spread": max(absorb_times) / min(absorb_times) - 1,
    }


@torch.inference_mode()
def many_users(engine: GenerativeAdapterModel, options: BenchOptions) -> list[dict]:
    tok = engine.tokenizer
    sampling = fixed_length(options.decode_tokens)
    rows = []
    for users in options.users:
        histories = [history_text(history_turns(tok, 300, seed=100 + u)) for u in range(users)]
        states = engine.absorb_many([engine.empty_state()] * users, histories)
        prompts = [prompt_ids(tok, f"{QUESTION} ({u})") for u in range(users)]
        run = {
            "base": lambda: reply(engine, [ReplyRequest(p, None, sampling) for p in prompts]),
            "adapters": lambda: reply(engine, [ReplyRequest(p, s, sampling) for p, s in zip(prompts, states)]),
        }
        run["base"]()  # warm-up at this batch size
        seconds = interleaved_medians(run, options.repeats)
        new_tokens = users * options.decode_tokens
        rows.append({"users": users, "base_tokens_per_s": new_tokens / seconds["base"],
                     "adapter_tokens_per_s": new_tokens / seconds["adapters"],
                     "adapter_overhead": seconds["adapters"] / seconds["base"] - 1})
    return rows


def memory_size(engine: GenerativeAdapterModel, options: BenchOptions) -> list[dict]:
    tok = engine.tokenizer
    config = engine.base_model.config
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    element = torch.finfo(next(engine.base_model.parameters()).dtype).bits // 8
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    state_bytes = len(engine.empty_state().to_bytes())
    rows = []
    for length in options.lengths:
        text = history_text(history_turns(tok, length))
        tokens = count_tokens(tok, text)
        rows.append({"history_tokens": tokens, "adapter_state_bytes": state_bytes,
                     "kv_cache_bytes": kv_per_token * tokens, "raw_text_bytes": len(text.encode())})
    return rows
