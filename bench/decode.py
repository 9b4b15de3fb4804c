"""Decode speed beside llama.cpp's on the same model file, and what the lean step changes in answers.

Ours: greedy decoding of `decode_bench_tokens` tokens per user after a short prompt, the prefill not
counted (llama.cpp's tg128 has no prompt at all), every user with their own adapter (one user: the
folded LoRA pair; several: each row its own memory), on the lean step and on the transformers path
it replaced. llama.cpp: its own `llama-bench` (tg128) and `llama-batched-bench` (text generation at
1, 4, 16 parallel sequences), built by scripts/build-llama-bench.sh, with the same threads.

Prefill: one prompt of each of `prefill_lengths` tokens through DecodeBatch.prefill (what a reply's
prompt and, the same forward pass, a compression's history cost), against llama-bench's pp at the
same lengths.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from pathlib import Path

import torch

from adapter_core import GenerativeAdapterModel
from adapter_core.base_model import default_gguf_path
from adapter_core.data.conversation import history_text, prompt_ids
from adapter_core.serving.decoding import DecodeBatch, ReplyRequest

from .sections import BenchOptions, fixed_length, history_turns

log = logging.getLogger(__name__)

LLAMA_CPP = Path("data/llama.cpp/bin")
"""Where scripts/build-llama-bench.sh puts llama.cpp's benchmark tools."""
AGREEMENT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for a job interview.",
    "How do I make a cup of tea?",
    "What did you have for breakfast?",
    "Summarize the plot of Romeo and Juliet.",
    "List some fruits that are red.",
)


def decode(engine: GenerativeAdapterModel, options: BenchOptions) -> dict:
    """The "decode" section: our tokens/s (lean and transformers paths), llama.cpp's, and agreement."""
    ours = [dict(users=users, **{path: tokens_per_s(engine, users, options.decode_bench_tokens, lean=path == "lean")
                                 for path in ("lean", "transformers")})
            for users in options.users]
    llama = llama_cpp_speeds(options.users, options.decode_bench_tokens, torch.get_num_threads(),
                             options.prefill_lengths)
    for row in ours:
        theirs = llama.get("tokens_per_s", {}).get(row["users"])
        row["llama_cpp"] = theirs
        row["ratio"] = row["lean"] / theirs if theirs else None
    prefill = []
    for n in options.prefill_lengths:
        theirs = llama.get("prefill_tokens_per_s", {}).get(n)
        mine = prefill_tokens_per_s(engine, n)
        prefill.append({"tokens": n, "ours": mine, "llama_cpp": theirs, "ratio": mine / theirs if theirs else None})
    return {"rows": ours, "prefill": prefill, "llama_cpp": llama, "threads": torch.get_num_threads(),
            "agreement": agreement(engine, options.agreement_tokens)}


def _adapted_states(engine: GenerativeAdapterModel, users: int) -> list:
    histories = [history_text(history_turns(engine.tokenizer, 300, seed=200 + u)) for u in range(users)]
    return engine.absorb_many([engine.empty_state()] * users, histories)


@torch.inference_mode()
def tokens_per_s(engine: GenerativeAdapterModel, users: int, tokens: int, lean: bool) -> float:
    """Decoded tokens per second of `users` rows in one batch, prefill excluded (best of 2 runs)."""
    states = _adapted_states(engine, users)
    prompts = [prompt_ids(engine.tokenizer, f"Tell me a long story, please ({u}).") for u in range(users)]
    best = 0.0
    for _ in range(2):
        batch = DecodeBatch(engine, lean=lean)
        batch.join([ReplyRequest(p, s, fixed_length(tokens + 1)) for p, s in zip(prompts, states)])  # 1 token from prefill
        started = time.perf_counter()
        while not all(row.finish for row in batch.rows):
            batch.step()
        best = max(best, users * tokens / (time.perf_counter() - started))
    return best


@torch.inference_mode()
def prefill_tokens_per_s(engine: GenerativeAdapterModel, tokens: int) -> float:
    """Prompt tokens per second of one prompt of `tokens` tokens run by DecodeBatch.prefill, as a reply's
    prompt is (no adapter: llama-bench's pp has none), best of 2 runs."""
    ids = tuple(range(1000, 1000 + tokens))  # any tokens: the cost does not depend on which
    best = math.inf
    for _ in range(2):
        started = time.perf_counter()
        DecodeBatch(engine).prefill([ReplyRequest(ids, None, fixed_length(1))])
        best = min(best, time.perf_counter() - started)
    return tokens / best


def llama_cpp_speeds(users: tuple[int, ...], tokens: int, threads: int, prefill: tuple[int, ...] = (),
                     tools: Path = LLAMA_CPP) -> dict:
    """llama.cpp's decode tokens/s on the default model's GGUF, {"tokens_per_s": {users: t/s}, ...}, and
    its prompt processing at each length of `prefill` ({"prefill_tokens_per_s": {tokens: t/s}}, its ppN);
    or {"skipped": why} when its tools are not built."""
    bench, batched = tools / "llama-bench", tools / "llama-batched-bench"
    if not bench.exists():
        return {"skipped": not_built(bench)}
    gguf = str(default_gguf_path())
    single = json.loads(_run([str(bench), "-m", gguf, "-t", str(threads), "-p", ",".join(map(str, (0, *prefill))),
                              "-n", str(tokens), "-r", "5", "-o", "json"]))
    speeds = {1: next(r["avg_ts"] for r in single if r.get("n_prompt", 0) == 0 and r["n_gen"] == tokens)}
    prompts = {r["n_prompt"]: r["avg_ts"] for r in single if r.get("n_prompt", 0) in prefill and r["n_gen"] == 0}
    parallel = [u for u in users if u > 1]
    if parallel and batched.exists():
        out = _run([str(batched), "-m", gguf, "-t", str(threads), "-c", str(max(parallel) * (tokens + 64)),
                    "-npp", "1", "-ntg", str(tokens), "-npl", ",".join(map(str, parallel)), "--output-format", "jsonl"])
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                speeds[row["pl"]] = row["speed_tg"]
    return {"tokens_per_s": speeds, "prefill_tokens_per_s": prompts, "tg": f"tg{tokens}", "model": Path(gguf).name,
            "version": llama_cpp_version(tools)}


def not_built(tool: Path) -> str:
    """Why a llama.cpp tool's figures are missing, and how to get them."""
    return f"{tool} not found: build it with `bash scripts/build-llama-bench.sh` (about 15 minutes)"


def llama_cpp_version(tools: Path) -> str | None:
    """Which llama-cpp-python sdist scripts/build-llama-bench.sh built the tools in `tools` from."""
    recorded = tools.parent / "VERSION"
    return recorded.read_text().strip() if recorded.exists() else None


def _run(command: list[str]) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout


@torch.inference_mode()
def agreement(engine: GenerativeAdapterModel, tokens: int) -> dict:
    """The lean step against the transformers path on AGREEMENT_PROMPTS, each with an adapter: the
    share of positions where greedy picks the same token when both read the same text (the
    transformers path's own greedy reply), and each path's perplexity of that text."""
    states = _adapted_states(engine, len(AGREEMENT_PROMPTS))
    same = total = 0
    nll = {"lean": 0.0, "transformers": 0.0}
    for question, state in zip(AGREEMENT_PROMPTS, states):
        request = ReplyRequest(prompt_ids(engine.tokenizer, question), state, fixed_length(tokens))
        reference, logits = _forced(engine, request, None, lean=False)
        _, lean_logits = _forced(engine, request, reference, lean=True)
        for path, seen in (("transformers", logits), ("lean", lean_logits)):
            nll[path] += float(torch.nn.functional.cross_entropy(seen, torch.tensor(reference), reduction="sum"))
        same += int((lean_logits.argmax(-1) == torch.tensor(reference)).sum())
        total += len(reference)
    perplexity = {path: math.exp(value / total) for path, value in nll.items()}
    return {"tokens": total, "same_greedy_token": same / total, "perplexity": perplexity,
            "perplexity_ratio": perplexity["lean"] / perplexity["transformers"]}


def _forced(engine: GenerativeAdapterModel, request: ReplyRequest, forced: list[int] | None,
            lean: bool) -> tuple[list[int], torch.Tensor]:
    """Decode one request, feeding `forced` tokens instead of its own choices when given: the tokens
    fed and the logits (T, V) each was chosen from."""
    batch = DecodeBatch(engine, lean=lean)
    seen: list[torch.Tensor] = []
    choose = batch._choose

    def recording(rows, logits):
        seen.append(logits[0].clone())
        choose(rows, logits)
        if forced is not None and len(rows[0].tokens) <= len(forced):
            rows[0].tokens[-1] = rows[0].last = forced[len(rows[0].tokens) - 1]

    batch._choose = recording
    (row,) = batch.join([request])
    while not row.finish:
        batch.step()
    return list(row.tokens), torch.stack(seen[:len(row.tokens)])
