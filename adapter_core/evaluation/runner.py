"""Asking every question of every conversation in several modes and scoring the answers.

Modes:
  closed_book     the question alone, base model: what can be guessed without memory
  full_history    all turns in the prompt (earliest dropped when longer than the model's window)
  adapter         the whole history absorbed into an adapter, the question alone in the prompt
  adapter_recent  all but the last `recent_turns` turns absorbed, those in the prompt (as in the app)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.conversation import history_text, left_pad, prompt_ids
from ..data.dataset import Conversation
from ..decoding import ReplyRequest, count_tokens, fit_prompt, reply
from ..model import GenerativeAdapterModel
from ..sampling import SamplingConfig
from ..state import AdapterState
from .metrics import contains_answer, token_f1

MODES = ("closed_book", "full_history", "adapter", "adapter_recent")


@dataclass
class EvalOptions:
    modes: tuple[str, ...] = MODES
    """Which modes to run (see the module docstring)."""
    max_new_tokens: int = 24
    """Greedy answer length; answers are short facts."""
    recent_turns: int = 4
    """Turns kept in the prompt, not in the adapter, in adapter_recent mode."""
    batch_size: int = 8
    """Questions decoded together (prompts of the same mode are batched together)."""
    conversations_per_pass: int = 8
    """Conversations absorbed together in one batch."""
    context_limit: int | None = None
    """Prompt + answer tokens the model can attend to; default: the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")


@dataclass
class Result:
    conversation: str
    mode: str
    question: str
    answer: str
    prediction: str
    correct: bool
    f1: float
    nll: float
    """Mean negative log-likelihood per token of the gold answer as the reply."""
    superseded: bool
    """The prediction contains an out-of-date value of an updated fact."""
    has_update: bool
    history_tokens: int
    prompt_tokens: int
    truncated: bool
    n_facts: int | None
    kind: str


@dataclass
class _Ask:
    conversation: Conversation
    index: int
    mode: str
    prompt: list[int]
    state: AdapterState | None
    truncated: bool
    history_tokens: int


def evaluate(engine: GenerativeAdapterModel, conversations: Sequence[Conversation],
             options: EvalOptions | None = None, progress: bool = True) -> list[Result]:
    options = options or EvalOptions()
    limit = options.context_limit or engine.base_model.config.max_position_embeddings
    results: list[Result] = []
    bar = tqdm(total=sum(len(c.questions) for c in conversations) * len(options.modes), disable=not progress,
               desc="evaluating", unit="answer")
    step = options.conversations_per_pass
    for start in range(0, len(conversations), step):
        group = list(conversations[start:start + step])
        asks = _prepare(engine, group, options, limit)
        for mode in options.modes:
            mode_asks = [a for a in asks if a.mode == mode]
            mode_asks.sort(key=lambda a: len(a.prompt))  # less padding per batch
            for b in range(0, len(mode_asks), options.batch_size):
                batch = mode_asks[b:b + options.batch_size]
                predictions = _generate(engine, batch, options.max_new_tokens)
                nlls = _answer_nll(engine, batch)
                for ask, prediction, nll in zip(batch, predictions, nlls):
                    results.append(_score(ask, prediction, nll))
                bar.update(len(batch))
    bar.close()
    return results


def _prepare(engine: GenerativeAdapterModel, group: list[Conversation], options: EvalOptions,
             limit: int) -> list[_Ask]:
    tok = engine.tokenizer
    histories = [c.turns for c in group]
    k = options.recent_turns
    states: dict[str, list[AdapterState]] = {}
    if "adapter" in options.modes:
        states["adapter"] = engine.absorb_many([engine.empty_state()] * len(group),
                                               [history_text(h) for h in histories])
    if "adapter_recent" in options.modes:
        states["adapter_recent"] = engine.absorb_many([engine.empty_state()] * len(group),
                                                      [history_text(h[:len(h) - k]) for h in histories])
    asks = []
    for u, (conversation, turns) in enumerate(zip(group, histories)):
        history_tokens = count_tokens(tok, history_text(turns))
        for i, q in enumerate(conversation.questions):
            for mode in options.modes:
                truncated = False
                if mode == "full_history":
                    prompt, kept = fit_prompt(tok, q.question, turns, limit - options.max_new_tokens)
                    truncated = len(kept) < len(turns)
                elif mode == "adapter_recent":
                    prompt = prompt_ids(tok, q.question, turns[len(turns) - k:] if k else [])
                else:
                    prompt = prompt_ids(tok, q.question)
                state = states[mode][u] if mode in states else None
                asks.append(_Ask(conversation, i, mode, prompt, state, truncated, history_tokens))
    return asks


def _generate(engine: GenerativeAdapterModel, batch: list[_Ask], max_new_tokens: int) -> list[str]:
    """Greedy answers, each row with its own adapter state, decoded together."""
    greedy = SamplingConfig.greedy(max_new_tokens)
    return [r.text for r in reply(engine, [ReplyRequest(a.prompt, a.state, greedy) for a in batch])]


@torch.no_grad()
def _answer_nll(engine: GenerativeAdapterModel, batch: list[_Ask]) -> list[float]:
    """Teacher-forced mean NLL per token of each gold answer, following its prompt."""
    tok = engine.tokenizer
    answers = [tok(a.conversation.questions[a.index].answer, add_special_tokens=False)["input_ids"] for a in batch]
    ids, mask = left_pad([a.prompt + ans for a, ans in zip(batch, answers)], tok.pad_token_id)
    logits = engine(ids.to(engine.device), attention_mask=mask.to(engine.device),
                    states=[a.state for a in batch]).logits.float()
    nlls = []
    for row, ans in enumerate(answers):
        n = len(ans)
        predicted = logits[row, -n - 1:-1]  # positions that predict the answer tokens
        target = ids[row, -n:].to(predicted.device)
        nlls.append(F.cross_entropy(predicted, target).item())
    return nlls


def _score(ask: _Ask, prediction: str, nll: float) -> Result:
    q = ask.conversation.questions[ask.index]
    golds = [q.answer, *q.aliases]
    correct = contains_answer(prediction, golds)
    return Result(
        conversation=ask.conversation.id, mode=ask.mode, question=q.question, answer=q.answer,
        prediction=prediction, correct=correct, f1=token_f1(prediction, golds), nll=nll,
        superseded=bool(q.superseded) and contains_answer(prediction, q.superseded) and not correct,
        has_update=bool(q.superseded), history_tokens=ask.history_tokens, prompt_tokens=len(ask.prompt),
        truncated=ask.truncated, n_facts=ask.conversation.meta.get("n_facts"), kind=q.kind,
    )


# --- report ---------------------------------------------------------------------------------------


def length_bucket(tokens: int, limit: int) -> str:
    if tokens > limit:
        return f">{limit} (beyond window)"
    for edge, label in ((1024, "<1K"), (4096, "1K-4K")):
        if tokens < edge:
            return label
    return f"4K-{limit}"


def _cell(results: list[Result]) -> dict:
    n = len(results)
    return {
        "n": n,
        "accuracy": sum(r.correct for r in results) / n,
        "f1": sum(r.f1 for r in results) / n,
        "nll": sum(r.nll for r in results) / n,
        "truncated": sum(r.truncated for r in results),
        "mean_history_tokens": sum(r.history_tokens for r in results) / n,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in results) / n,
    }


def summarize(results: list[Result], limit: int) -> dict:
    """Cells by number of facts and by history length, per mode, plus fact-update outcomes."""
    by: dict[str, dict] = {"facts": defaultdict(list), "length": defaultdict(list), "all": defaultdict(list)}
    updates = defaultdict(list)
    for r in results:
        by["facts"][(str(r.n_facts), r.mode)].append(r)
        by["length"][(length_bucket(r.history_tokens, limit), r.mode)].append(r)
        by["all"][("all", r.mode)].append(r)
        if r.has_update:
            updates[r.mode].append(r)
    summary = {dimension: [{"cell": cell, "mode": mode, **_cell(rs)} for (cell, mode), rs in groups.items()]
               for dimension, groups in by.items()}
    summary["updates"] = [
        {"mode": mode, "n": len(rs), "latest": sum(r.correct for r in rs) / len(rs),
         "superseded": sum(r.superseded for r in rs) / len(rs)}
        for mode, rs in updates.items()
    ]
    summary["context_limit"] = limit
    return summary


def markdown_report(summary: dict, modes: Sequence[str], title: str = "Evaluation") -> str:
    lines = [f"# {title}", ""]
    for dimension, heading in (("facts", "By number of facts"), ("length", "By history length (tokens)"),
                               ("all", "All questions")):
        rows = defaultdict(dict)
        for c in summary[dimension]:
            rows[c["cell"]][c["mode"]] = c
        lines += [f"## {heading}", "", "accuracy / token F1 / answer NLL (n questions)", "",
                  "| cell | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        for cell in sorted(rows, key=_cell_order):
            cells = [rows[cell].get(m) for m in modes]
            lines.append(f"| {cell} | " + " | ".join(
                "–" if c is None else f"{c['accuracy']:.3f} / {c['f1']:.3f} / {c['nll']:.2f} ({c['n']})"
                + (f", {c['truncated']} truncated" if c["truncated"] else "") for c in cells) + " |")
        lines.append("")
    if summary["updates"]:
        lines += ["## Updated facts", "", "| mode | n | latest value | superseded value |", "|---|---|---|---|"]
        for u in summary["updates"]:
            lines.append(f"| {u['mode']} | {u['n']} | {u['latest']:.3f} | {u['superseded']:.3f} |")
        lines.append("")
    lines.append(f"Full-history prompts longer than the model's window ({summary['context_limit']} tokens) "
                 "keep their most recent turns; the count of truncated prompts is shown per cell.")
    return "\n".join(lines) + "\n"


def _cell_order(cell: str) -> tuple:
    digits = "".join(ch for ch in cell.split("-")[0] if ch.isdigit())
    return (cell.startswith(">"), int(digits) if digits else math.inf, cell)


def results_as_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]
