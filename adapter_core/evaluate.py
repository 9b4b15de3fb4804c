"""Measure what adapters remember: `python -m adapter_core.evaluate`.

Runs every question of a JSONL file (docs/eval-format.md) or of the synthetic held-out set in the
chosen modes, then writes report.json, report.md and answers.jsonl to --out.

Examples:
  python -m adapter_core.evaluate --synthetic --facts 1 3 --lengths 512 --per-cell 32 --out eval/quick
  python -m adapter_core.evaluate --data my_dataset.jsonl --modes closed_book adapter --out eval/mine
  python -m adapter_core.evaluate --synthetic --write-data heldout.jsonl   # only write the set
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .engine import load_engine
from .data.dataset import read_jsonl, write_jsonl
from .data.personas import VALUES, make_eval_set
from .evaluation.leakage import neutral_perplexity
from .evaluation.report import markdown_report, summarize
from .evaluation.runner import MODES, SWAPPED, EvalOptions, context_limit, evaluate, results_as_dicts
from .memory.finetune import LOSS_ON, FinetuneCompressor, FinetuneConfig
from .memory.restatement import RECALLS

log = logging.getLogger(__name__)


FINETUNE_FLAGS = ("steps", "lr", "batch_tokens", "min_passes", "loss_on", "recall", "anchor_weight", "anchor_tokens")
"""The FinetuneConfig fields the command line sets (--finetune-<field>), for measuring one change at a time."""


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The finetuned modes' settings: FinetuneConfig's defaults but what --finetune-* changed."""
    return FinetuneConfig(**{field: getattr(args, f"finetune_{field}") for field in FINETUNE_FLAGS})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="JSONL file of conversations with questions")
    source.add_argument("--synthetic", action="store_true", help="the synthetic held-out set")
    p.add_argument("--facts", type=int, nargs="+", default=[1, 3, 6, 10], help="synthetic: facts per conversation")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 12288],
                   help="synthetic: history lengths in tokens (about)")
    p.add_argument("--per-cell", type=int, default=256, help="synthetic: at least this many questions per cell")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed of the held-out set")
    p.add_argument("--values", choices=VALUES, default="invented",
                   help="synthetic: facts with invented values (made-up words) or everyday ones (a city, a pet's "
                        "name, a job, a colour: words a small model can say)")
    p.add_argument("--write-data", type=Path, help="write the conversations as JSONL (and stop if no --out)")
    p.add_argument("--limit", type=int, help="only the first N conversations")
    p.add_argument("--modes", nargs="+", choices=MODES,
                   help="default: all (the swapped modes only where there are at least two conversations)")
    for field in FINETUNE_FLAGS:  # --finetune-steps, --finetune-anchor-weight, ...
        default = getattr(FinetuneConfig, field)  # its type parses the flag: a float field needs a float default
        p.add_argument(f"--finetune-{field.replace('_', '-')}", type=type(default), default=default,
                       choices={"loss_on": LOSS_ON, "recall": RECALLS}.get(field),
                       help=f"finetuned modes: FinetuneConfig.{field} (default {default})")
    p.add_argument("--model", default=None, help="base model id or path (default: embedded SmolLM2-135M)")
    p.add_argument("--checkpoint", default=None, help="generator folder (default: the shipped one)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cache-dir", default="data/model-cache", help="dequantized default model cache")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--recent-turns", type=int, default=4)
    p.add_argument("--context-limit", type=int, default=None,
                   help="prompt + answer tokens; longer prompts drop their earliest turns "
                        "(default: the model's max_position_embeddings)")
    p.add_argument("--out", type=Path, help="folder for report.json, report.md and answers.jsonl")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.synthetic:
        conversations = make_eval_set(args.seed, args.facts, args.lengths, args.per_cell, values=args.values)
        source = (f"synthetic held-out set ({args.values} values, seed {args.seed}, facts {args.facts}, "
                  f"lengths {args.lengths})")
    else:
        conversations = list(read_jsonl(args.data))
        source = str(args.data)
    conversations = conversations[:args.limit] if args.limit else conversations
    dated_chats = sum(1 for c in conversations if not c.named and any(s.date for s in c.sessions))
    if dated_chats:
        log.warning("%d chat conversations (turns with roles) have session dates, which a chat prompt does not "
                    "show; give the turns speakers' names to have them shown as a dated transcript", dated_chats)
    if args.write_data:
        count = write_jsonl(conversations, args.write_data)
        print(f"wrote {count} conversations to {args.write_data}")
        if args.out is None:
            return None
    if args.out is None:
        raise SystemExit("--out is required to run the evaluation")
    if args.modes is None:  # one conversation has no other user's adapter to swap in
        args.modes = [m for m in MODES if m not in SWAPPED or len(conversations) > 1]
    elif set(SWAPPED) & set(args.modes) and len(conversations) < 2:
        raise SystemExit("the swapped modes need at least two conversations")

    engine = load_engine(args.model, args.checkpoint, device=args.device, cache_dir=args.cache_dir)
    options = EvalOptions(modes=tuple(args.modes), max_new_tokens=args.max_new_tokens,
                          recent_turns=args.recent_turns, batch_size=args.batch_size,
                          context_limit=args.context_limit)
    compressor = FinetuneCompressor(engine, finetune_config(args))
    started, timings, finetuned = time.perf_counter(), {}, {}
    with torch.inference_mode():
        results = evaluate(engine, conversations, options, compressor=compressor, timings=timings, finetuned=finetuned)
    summary = summarize(results, context_limit(engine, options))
    if finetuned:  # does a user's pair leak into replies about other things?
        summary["neutral_perplexity"] = neutral_perplexity(engine, list(finetuned.values()))
    summary.update(source=source, base_model=engine.base_model_id, generator=engine.generator_id,
                   finetune=asdict(compressor.config), seconds_by_part=timings,
                   modes=list(args.modes), conversations=len(conversations), questions=len(results) // len(args.modes),
                   seconds=round(time.perf_counter() - started, 1), device=str(engine.device),
                   command=shlex.join(["python", "-m", "adapter_core.evaluate", *argv]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(summary, indent=2))
    (args.out / "report.md").write_text(markdown_report(summary, args.modes, f"Evaluation: {source}"))
    with open(args.out / "answers.jsonl", "w") as f:
        for row in results_as_dicts(results):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print((args.out / "report.md").read_text())
    return summary


if __name__ == "__main__":
    main()
