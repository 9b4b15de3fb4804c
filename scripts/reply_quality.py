"""Reply quality of the default model under several decoding settings, on a fixed set of prompts.

    .venv/bin/python scripts/reply_quality.py --settings all --out runs/reply-quality.json   # ~10 min, 2 CPUs
    .venv/bin/python scripts/reply_quality.py --out runs/rq.json          # old vs new defaults, 2-3 min

For each setting: reply length in tokens, how many replies hit the token cap or stopped at the end
of their turn, the share of repeated word 4-grams (degeneration), and seconds per reply. Default
model, no adapter, the app's prompt format; sampled settings use fixed seeds (one per prompt and
seed index), so a run is reproducible on the same machine. docs/reply-quality.md has the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter_core.data.conversation import Turn, prompt_ids  # noqa: E402
from adapter_core.serving.decoding import Reply, ReplyRequest, reply  # noqa: E402
from adapter_core.serving.sampling import SamplingConfig, end_of_turn_ids, repetition_stats  # noqa: E402

PROMPTS: tuple[tuple[str, tuple[Turn, ...]], ...] = (
    ("Hi!", ()),
    ("Good morning, how are you today?", ()),
    ("My name is Dana and I work as a nurse in Leeds.", ()),
    ("What is the capital of Japan?", ()),
    ("Why is the sky blue?", ()),
    ("Give me three tips for sleeping better.", ()),
    ("Can you write a two-line poem about autumn?", ()),
    # with earlier turns in the prompt, as the app sends turns not yet absorbed into the adapter
    ("I'm feeling a bit stressed about my exams next week.",
     (Turn("user", "Hi, I'm Sam. I study chemistry."), Turn("assistant", "Nice to meet you, Sam! How can I help?"))),
    ("List four fruits that are high in vitamin C.",
     (Turn("user", "I want to eat more healthily."),
      Turn("assistant", "That's a great goal! Eating more fruit and vegetables is a good start."))),
    ("What is my dog's name, and what does he love?",
     (Turn("user", "I have a dog called Biscuit."), Turn("assistant", "Biscuit is a lovely name! What is he like?"),
      Turn("user", "He is a beagle and he loves running on the beach."),
      Turn("assistant", "Beagles have so much energy, the beach must be his favourite place!"))),
)
"""Ten messages (greetings, personal facts, questions, a list, a poem), three after earlier turns."""

MODES = {"single": "each message on its own, after its own earlier turns",
         "conversation": f"the messages as one chat, each after the last {{}} turns of that chat and its own"}
CONVERSATION_TURNS = 6
"""Turns of the running chat kept in the prompt in conversation mode: about what the app holds
between two compressions (it absorbs a user's turns once 4 of their messages are pending)."""
MODES["conversation"] = MODES["conversation"].format(CONVERSATION_TURNS)

OLD = "old"
"""The app before SamplingConfig: greedy, 200 tokens, no penalty (it stopped at the tokenizer's eos,
which for SmolLM2 is also the end of turn)."""
OLD_MAX_NEW_TOKENS = 200

CANDIDATES: dict[str, SamplingConfig] = {
    "card-t0.2": SamplingConfig(temperature=0.2, top_p=0.9, repetition_penalty=1.0, max_new_tokens=OLD_MAX_NEW_TOKENS),
    "t0.2-rp1.2-prompt": SamplingConfig(temperature=0.2, top_p=0.9, repetition_penalty=1.2, penalize_prompt=True,
                                        max_new_tokens=OLD_MAX_NEW_TOKENS),
    "t0.2-rp1.1": SamplingConfig(temperature=0.2, top_p=0.9, repetition_penalty=1.1, max_new_tokens=OLD_MAX_NEW_TOKENS),
    "t0.2-rp1.2": SamplingConfig(temperature=0.2, top_p=0.9, repetition_penalty=1.2, max_new_tokens=OLD_MAX_NEW_TOKENS),
    "t0.3-rp1.2": SamplingConfig(temperature=0.3, top_p=0.9, repetition_penalty=1.2, max_new_tokens=OLD_MAX_NEW_TOKENS),
    "greedy-rp1.2": SamplingConfig.greedy(OLD_MAX_NEW_TOKENS, repetition_penalty=1.2),
    "new": SamplingConfig(),
}
"""Candidates at the old cap of 200 (to see where replies end by themselves), and the new defaults."""


def settings(name: str) -> SamplingConfig:
    """The decoding setting called `name`."""
    return SamplingConfig.greedy(OLD_MAX_NEW_TOKENS) if name == OLD else CANDIDATES[name]


def generate_one(engine, ids: list[int], sampling: SamplingConfig, seed: int) -> Reply:
    return reply(engine, [ReplyRequest(ids, None, sampling, seed=seed)])[0]


def reply_record(prompt: str, seed: int, answer: Reply) -> dict:
    stopped = answer.finish == "end"
    return dict(prompt=prompt, seed=seed, text=answer.text, tokens=len(answer.tokens),
                hit_cap=answer.finish == "length", stopped_at_end_of_turn=stopped,
                repeated_4gram_share=round(repetition_stats(answer.text, 4).repeated_share, 4),
                seconds=round(answer.total_s, 3))


def summarize(replies: list[dict]) -> dict:
    n = len(replies)
    tokens = [r["tokens"] for r in replies]
    seconds = [r["seconds"] for r in replies]
    return dict(replies=n, mean_tokens=round(statistics.mean(tokens), 1), median_tokens=statistics.median(tokens),
                hit_cap=round(sum(r["hit_cap"] for r in replies) / n, 3),
                stopped_at_end_of_turn=round(sum(r["stopped_at_end_of_turn"] for r in replies) / n, 3),
                repeated_4gram_share=round(statistics.mean(r["repeated_4gram_share"] for r in replies), 3),
                looping_replies=round(sum(r["repeated_4gram_share"] > 0.2 for r in replies) / n, 3),
                mean_seconds=round(statistics.mean(seconds), 2),
                tokens_per_second=round(sum(tokens) / sum(seconds), 1))


COLUMNS = (("setting", "{}"), ("replies", "{}"), ("mean_tokens", "{:.1f}"), ("median_tokens", "{:g}"),
           ("hit_cap", "{:.0%}"), ("stopped_at_end_of_turn", "{:.0%}"), ("repeated_4gram_share", "{:.3f}"),
           ("looping_replies", "{:.0%}"), ("mean_seconds", "{:.2f}"), ("tokens_per_second", "{:.1f}"))


def table(summaries: dict[str, dict]) -> str:
    """A Markdown table, one row per setting."""
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, s in summaries.items():
        lines.append("| " + " | ".join(fmt.format(name if c == "setting" else s[c]) for c, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the figures and the replies")
    parser.add_argument("--settings", default="old,new",
                        help=f"comma-separated, from: {OLD}, {', '.join(CANDIDATES)} (or 'all')")
    parser.add_argument("--seeds", type=int, default=3, help="replies per prompt for sampled settings")
    parser.add_argument("--mode", choices=["single", "conversation", "both"], default="both",
                        help="; ".join(f"{k}: {v}" for k, v in MODES.items()))
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (a quick check)")
    parser.add_argument("--cache-dir", default="data/model-cache", help="dequantized model cache (see load_engine)")
    args = parser.parse_args(argv)
    names = [OLD, *CANDIDATES] if args.settings == "all" else [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n != OLD and n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown settings {unknown}")
    prompts = PROMPTS[:args.limit] if args.limit else PROMPTS

    from adapter_core.engine import load_engine
    engine = load_engine(cache_dir=args.cache_dir)
    tok = engine.tokenizer
    end_ids = end_of_turn_ids(tok)
    print(f"eos {tok.eos_token!r} ({tok.eos_token_id}); end of turn ids {end_ids} "
          f"({', '.join(tok.convert_ids_to_tokens(end_ids))}); {torch.get_num_threads()} torch threads", flush=True)
    generate_one(engine, prompt_ids(tok, "Hello"), SamplingConfig.greedy(4), 0)  # warm-up

    # Settings take turns prompt by prompt, so that load from other programs on the machine falls on
    # all of them alike.
    modes = ["single", "conversation"] if args.mode == "both" else [args.mode]
    replies = {mode: {name: [] for name in names} for mode in modes}
    chats: dict[tuple[str, int], list[Turn]] = {}  # (setting, seed index) -> the conversation so far
    for i, (message, turns) in enumerate(prompts):
        for mode in modes:
            for name in names:
                sampled = settings(name).do_sample
                for s in range(args.seeds) if sampled else range(1):
                    chat = chats.setdefault((name, s), []) if mode == "conversation" else []
                    pending = (*chat[-CONVERSATION_TURNS:], *turns)
                    ids = prompt_ids(tok, message, pending)
                    seed = 1000 * s + i
                    r = reply_record(message, seed, generate_one(engine, ids, settings(name), seed))
                    r.update(earlier_turns=len(pending), prompt_tokens=len(ids))
                    replies[mode][name].append(r)
                    chat += [Turn("user", message), Turn("assistant", r["text"] or "…")]
                    print(f"[{mode[:4]} {name}] {r['tokens']:3d} tok {r['seconds']:5.1f} s "
                          f"rep {r['repeated_4gram_share']:.2f} "
                          f"{'CAP' if r['hit_cap'] else 'eot' if r['stopped_at_end_of_turn'] else '?'} | "
                          f"{message[:30]!r} -> {r['text'][:70]!r}", flush=True)
    results = {mode: {} for mode in modes}
    for mode in modes:
        for name in names:
            results[mode][name] = dict(settings=asdict(settings(name)),
                                       summary=summarize(replies[mode][name]), replies=replies[mode][name])
        print(f"\n{mode} ({MODES[mode]})\n" + table({n: r["summary"] for n, r in results[mode].items()}))
    report = dict(date=date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
                  f"{torch.get_num_threads()} torch threads", model=engine.base_model_id,
                  eos_token_id=tok.eos_token_id, end_of_turn_ids=end_ids, seeds=args.seeds,
                  conversation_turns=CONVERSATION_TURNS,
                  prompts=[dict(message=m, earlier_turns=[asdict(t) for t in ts]) for m, ts in prompts],
                  results=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
