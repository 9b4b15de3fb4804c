"""The fine-tuning compressor's cost (adapter_core.memory.finetune): seconds to absorb 1K and 2K new tokens,
how a user's compressions cost as their history grows (1st, 5th, 20th: each trains on its new turns
and a bounded replay, not on the whole history), whether a fact of the first compression is still
recalled after 10 later ones, and a new reply's first token while one runs."""

from __future__ import annotations

import threading
import time

from adapter_core import GenerativeAdapterModel
from adapter_core.data.conversation import Turn, history_text, prompt_ids
from adapter_core.evaluation.answering import answer
from adapter_core.serving.decoding import ReplyRequest
from adapter_core.memory.finetune import FinetuneCompressor, replay_sample
from adapter_core.serving.sampling import SamplingConfig
from adapter_core.serving.scheduler import InferenceLoop

from .concurrency import _with_loop_on_this_thread
from .sections import QUESTION, BenchOptions, history_turns


def finetune_compression(engine: GenerativeAdapterModel, options: BenchOptions) -> dict:
    compressor = FinetuneCompressor(engine)
    tok = engine.tokenizer
    turns = history_turns(tok, max(options.finetune_tokens) * 2 + 4000, seed=7)
    texts = [history_text([t]) for t in turns]

    absorb = []
    for tokens in options.finetune_tokens:
        text = _first_tokens(tok, texts, tokens)
        started = time.perf_counter()
        compressor.absorb(compressor.empty_state(), text)
        absorb.append({"tokens": len(tok(text, add_special_tokens=False)["input_ids"]),
                       "seconds": round(time.perf_counter() - started, 2)})

    # one user's compressions in turn, each of `turns_per_compression` new turns, with the replay the app
    # gives; the first holds a fact too, asked after the first compression and after 10 more
    per = options.turns_per_compression
    texts = [history_text(list(RECALL_FACT)), *texts]
    state, series, recall = compressor.empty_state(), [], {"base": _recall(engine, None)}
    for n in range(1, options.compressions + 1):
        new, earlier = texts[(n - 1) * per:n * per], texts[:(n - 1) * per]
        replay = replay_sample(earlier, compressor.replay_tokens, tok, seed=n)
        started = time.perf_counter()
        state = compressor.absorb(state, "".join(new), replay)
        if n in (1, 5, 20) or n == options.compressions:
            series.append({"compression": n, "history_tokens": state.tokens, "seconds": round(time.perf_counter() - started, 2)})
        if n in (1, 11):
            recall[f"after {n}"] = _recall(engine, state)

    return {"config": compressor.config.__dict__, "absorb": absorb, "compressions": series, "recall": recall,
            "during": _first_token_during(engine, compressor, _first_tokens(tok, texts, max(options.finetune_tokens)),
                                          options)}


RECALL_FACT = (Turn("user", "By the way, my cat is called Tobrik."), Turn("assistant", "Got it, I'll remember that."))
RECALL_QUESTION, RECALL_ANSWER = "What is my cat called?", "Your cat is called Tobrik."


def _recall(engine: GenerativeAdapterModel, state) -> dict:
    """The first compression's fact, asked alone: the gold answer's NLL and the greedy answer."""
    tok = engine.tokenizer
    got = answer(engine, [prompt_ids(tok, RECALL_QUESTION)], [tok(RECALL_ANSWER, add_special_tokens=False)["input_ids"]],
                 [state], 24)[0]
    return {"nll": round(got.nll, 3), "answer": got.text, "says_it": "Tobrik" in got.text}


def _first_tokens(tokenizer, texts: list[str], tokens: int) -> str:
    """The first turns of texts holding about `tokens` tokens together."""
    kept, total = [], 0
    for text in texts:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if total + n > tokens:
            break
        kept.append(text)
        total += n
    return "".join(kept)


def _first_token_during(engine, compressor, text: str, options: BenchOptions) -> dict:
    """Replies sent one after another while a fine-tuning compression runs in the loop: their first tokens."""
    loop = InferenceLoop(engine)
    prompt = prompt_ids(engine.tokenizer, QUESTION)
    result: dict = {}

    def measure() -> None:
        loop.submit(ReplyRequest(prompt, None, SamplingConfig.greedy(4))).result()  # warm-up
        done = threading.Event()

        def compress() -> None:
            started = time.perf_counter()
            loop.absorb(compressor.empty_state(), text, compressor)
            result["compression_s"] = round(time.perf_counter() - started, 1)
            done.set()

        worker = threading.Thread(target=compress)
        worker.start()
        time.sleep(0.5)
        firsts = []
        while not done.is_set() and len(firsts) < options.replies_during_compression:
            firsts.append(loop.submit(ReplyRequest(prompt, None, SamplingConfig.greedy(4))).result().first_token_s)
        worker.join()
        result.update(first_token_s=[round(f, 3) for f in firsts], first_token_max_s=max(firsts) if firsts else None)

    _with_loop_on_this_thread(loop, measure)
    return result


def main(argv: list[str] | None = None) -> dict:
    """`python -m bench.finetune`: this section alone (docs/bench/finetune/ by default)."""
    from .__main__ import engine_of, section_alone
    from .report import finetune_markdown

    return section_alone(__doc__, "finetune", lambda args: finetune_compression(engine_of(args), BenchOptions()),
                         lambda results, folder: None, finetune_markdown, argv)


if __name__ == "__main__":
    main()
