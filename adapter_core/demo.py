"""A short tour of the engine on the embedded default model: `python -m adapter_core.demo`.

Absorbs a small conversation into an adapter, answers with and without it, exports the adapter
as a PEFT folder and prints what each step cost.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from .data.conversation import prompt_ids
from .serving.decoding import ReplyRequest, reply
from .engine import load_engine
from .memory.export import export_peft
from .serving.sampling import SamplingConfig

HISTORY = [
    "User: Hi! My name is Ilvara and I live in a town called Quenmoor.",
    "Assistant: Nice to meet you, Ilvara! How is life in Quenmoor?",
    "User: Quiet. My cat Tobrik sleeps all day and I work as a glassblower.",
]
QUESTION = "What is the name of my cat?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face id or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--checkpoint", default=None, help="generator folder (default: the shipped one)")
    parser.add_argument("--data-dir", default="data", help="where the model cache and the export go")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data = Path(args.data_dir)

    t = time.perf_counter()
    engine = load_engine(args.model, args.checkpoint, cache_dir=data / "model-cache")
    print(f"loaded {engine.base_model_id} + generator {engine.generator_id} in {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    state = engine.absorb(engine.empty_state(), "\n".join(HISTORY))
    print(f"absorbed {state.tokens} tokens in {state.windows} window(s) in {time.perf_counter() - t:.2f}s; "
          f"state is {state.nbytes() / 1024:.0f} KiB")

    tok = engine.tokenizer
    ids = prompt_ids(tok, QUESTION, system=None)
    greedy = SamplingConfig.greedy(args.max_new_tokens)
    t = time.perf_counter()
    replies = reply(engine, [ReplyRequest(ids, None, greedy), ReplyRequest(ids, state, greedy)])
    elapsed = time.perf_counter() - t
    print(f"\nQ: {QUESTION}  ({len(ids)} prompt tokens; both rows in one batch, {elapsed:.2f}s)")
    for label, answer in zip(("base model ", "with memory"), replies):
        print(f"  {label}: {answer.text!r}")

    folder = export_peft(engine, state, data / "demo-peft-export")
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"\nPEFT LoRA export: {folder} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
