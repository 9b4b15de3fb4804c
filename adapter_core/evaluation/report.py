"""The evaluation's tables: scores by cell (all, category, number of facts, history length) and
mode, how much of the history each mode could draw on, what became of updated facts, and the swap
test (each question under its own user's adapter and under another's)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from .runner import Result

DIMENSIONS = (("all", "All questions"), ("category", "By question category"), ("facts", "By number of facts"),
              ("length", "By history length (tokens)"), ("cell", "By number of facts and history length"))


def length_bucket(tokens: int, limit: int) -> str:
    if tokens > limit:
        return f">{limit} (beyond window)"
    for edge, label in ((1024, "<1K"), (4096, "1K-4K")):
        if tokens < edge:
            return label
    return f"4K-{limit}"


def _cell(results: list[Result]) -> dict:
    n = len(results)
    dated = [r.date_match for r in results if r.date_match is not None]
    return {
        "n": n,
        "contains": sum(r.contains for r in results) / n,
        "f1": sum(r.f1 for r in results) / n,
        "date_match": sum(dated) / len(dated) if dated else None,
        "dated": len(dated),
        "nll": sum(r.nll for r in results) / n,
        "truncated": sum(r.truncated for r in results),
        "mean_history_tokens": sum(r.history_tokens for r in results) / n,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in results) / n,
    }


def _kept(results: list[Result]) -> dict:
    """How much of the history one mode's answers could draw on."""
    with_turns = [r for r in results if r.history_turns]
    with_evidence = [r for r in results if r.evidence_cut is not None]
    return {
        "n": len(results),
        "truncated": sum(r.truncated for r in results),
        "turns_kept": _mean([r.kept_turns / r.history_turns for r in with_turns]),
        "tokens_kept": _mean([r.kept_tokens / r.history_tokens for r in with_turns if r.history_tokens]),
        "mean_kept_tokens": _mean([r.kept_tokens for r in results]),
        "mean_history_tokens": _mean([r.history_tokens for r in results]),
        "with_evidence": len(with_evidence),
        "evidence_cut": _mean([r.evidence_cut for r in with_evidence]),
    }


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(results: list[Result], limit: int) -> dict:
    """Cells by dimension and mode, what each mode kept of the history, fact-update outcomes."""
    keys = {"all": lambda r: "all", "category": lambda r: r.category or "(none)",
            "facts": lambda r: "(none)" if r.n_facts is None else str(r.n_facts),
            "length": lambda r: length_bucket(r.history_tokens, limit),
            "cell": lambda r: "(none)" if r.n_facts is None else _facts_and_length(r, limit)}
    summary: dict = {}
    for dimension, key in keys.items():
        groups = defaultdict(list)
        for r in results:
            groups[(key(r), r.mode)].append(r)
        if dimension != "all" and {cell for cell, _ in groups} <= {"(none)"}:
            continue  # the data has no categories (or no fact counts): the table would repeat "all"
        summary[dimension] = [{"cell": cell, "mode": mode, **_cell(rs)} for (cell, mode), rs in groups.items()]
    by_mode = defaultdict(list)
    updates = defaultdict(list)
    for r in results:
        by_mode[r.mode].append(r)
        if r.has_update:
            updates[r.mode].append(r)
    summary["history"] = [{"mode": mode, **_kept(rs)} for mode, rs in by_mode.items()]
    summary["updates"] = [
        {"mode": mode, "n": len(rs), "latest": sum(r.contains for r in rs) / len(rs),
         "superseded": sum(r.superseded for r in rs) / len(rs)}
        for mode, rs in updates.items()
    ]
    summary["swap_test"] = swap_test(results)
    summary["swap_test_finetuned"] = swap_test(results, "finetuned", "finetuned_swapped")
    by_cell = defaultdict(list)  # the "cell" dimension's cells, every mode together
    for r in results:
        by_cell[keys["cell"](r)].append(r)
    summary["swap_test_finetuned_by_cell"] = [
        {"cell": cell, **swap} for cell in sorted(by_cell, key=_cell_order)
        if cell != "(none)" and (swap := swap_test(by_cell[cell], "finetuned", "finetuned_swapped"))]
    summary["context_limit"] = limit
    return summary


def _facts_and_length(r: Result, limit: int) -> str:
    return f"{r.n_facts} facts, {length_bucket(r.history_tokens, limit)}"


def swap_test(results: list[Result], own_mode: str = "adapter", swapped_mode: str = "adapter_swapped") -> dict | None:
    """Each question's answer under its own user's adapter (own_mode: the generator's adapter, or
    finetuned) against the same question under another user's (swapped_mode): learning the answers'
    format lowers both NLLs alike, only memory of the user opens a gap. None without both modes."""
    own = {(r.conversation, r.question): r for r in results if r.mode == own_mode}
    pairs = [(own[key], r) for r in results if r.mode == swapped_mode
             and (key := (r.conversation, r.question)) in own]
    if not pairs:
        return None
    n = len(pairs)
    return {"n": n, "own_nll": sum(o.nll for o, _ in pairs) / n, "swapped_nll": sum(s.nll for _, s in pairs) / n,
            "gap": sum(s.nll - o.nll for o, s in pairs) / n, "own_better": sum(o.nll < s.nll for o, s in pairs),
            "own_contains": sum(o.contains for o, _ in pairs) / n,
            "swapped_contains": sum(s.contains for _, s in pairs) / n}


def markdown_report(summary: dict, modes: Sequence[str], title: str = "Evaluation") -> str:
    lines = [f"# {title}", ""]
    for dimension, heading in DIMENSIONS:
        if dimension not in summary:
            continue
        cells = {(c["cell"], c["mode"]): c for c in summary[dimension]}
        lines += [f"## {heading}", "",
                  "| cell | mode | n | contains | token F1 | date match (dated) | answer NLL | truncated |",
                  "|---|---|---|---|---|---|---|---|"]
        for cell in sorted({cell for cell, _ in cells}, key=_cell_order):
            for mode in modes:
                c = cells.get((cell, mode))
                if c is None:
                    continue
                dates = "–" if c["date_match"] is None else f"{c['date_match']:.3f} ({c['dated']})"
                lines.append(f"| {cell} | {mode} | {c['n']} | {c['contains']:.3f} | {c['f1']:.3f} | {dates} "
                             f"| {c['nll']:.2f} | {c['truncated'] or ''} |")
        lines.append("")
    history = {h["mode"]: h for h in summary["history"]}
    lines += ["## History the answers could draw on", "",
              "| mode | n | truncated | turns kept | tokens kept | mean tokens kept / history | evidence cut |",
              "|---|---|---|---|---|---|---|"]
    for mode in (m for m in modes if m in history):
        h = history[mode]
        evidence = ("–" if h["evidence_cut"] is None else
                    f"{h['evidence_cut']:.1%} of {h['with_evidence']}")
        lines.append(f"| {mode} | {h['n']} | {h['truncated']} | {_percent(h['turns_kept'])} "
                     f"| {_percent(h['tokens_kept'])} | {h['mean_kept_tokens']:.0f} / {h['mean_history_tokens']:.0f} "
                     f"| {evidence} |")
    lines.append("")
    if summary["updates"]:
        lines += ["## Updated facts", "", "| mode | n | latest value | superseded value |", "|---|---|---|---|"]
        for u in summary["updates"]:
            lines.append(f"| {u['mode']} | {u['n']} | {u['latest']:.3f} | {u['superseded']:.3f} |")
        lines.append("")
    swaps = [(kind, summary.get(key)) for kind, key in (("generator", "swap_test"), ("fine-tuned", "swap_test_finetuned"))
             if summary.get(key)]
    if swaps:
        lines += ["## Swap test: own adapter against another user's", "",
                  "| adapter | n | answer NLL, own | another's | gap | own lower | contains, own | another's |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_swap_row(kind, swap) for kind, swap in swaps]
        lines += [_swap_row(f"fine-tuned, {c['cell']}", c) for c in summary.get("swap_test_finetuned_by_cell", ())]
        lines += ["", "Format learning lowers both NLLs alike; a positive gap (another's adapter worse) is memory.", ""]
    neutral = summary.get("neutral_perplexity")
    if neutral:
        lines += ["## Unrelated text under each fine-tuned adapter", "",
                  f"Perplexity of everyday prose no conversation mentions (adapter_core/evaluation/neutral.txt): base "
                  f"model {neutral['base']:.2f}; under each of {neutral['n']} users' fine-tuned adapters "
                  f"{neutral['mean_ratio']:.3f}x on average, {neutral['max_ratio']:.3f}x at most (target <= 1.10x).", ""]
    timings = summary.get("seconds_by_part")
    if timings:
        lines += ["## Seconds", "", "| part | seconds |", "|---|---|"]
        lines += [f"| {part} | {seconds:,.1f} |" for part, seconds in timings.items()] + [""]
    lines += [
        "contains: a gold answer appears in the answer; token F1: word overlap; both on content words "
        "(no function words, on both sides). date match: the answer gives the gold answer's dates, over "
        "the questions whose gold answer holds one (their number in brackets). answer NLL: per token of "
        "the gold answer, teacher-forced after the same prompt.",
        "",
        f"Prompts longer than the context limit ({summary['context_limit']} tokens, less the answer's room) "
        "drop their earliest turns (truncated). Turns and tokens kept: the history's turns the answer could "
        "draw on, absorbed or in the prompt (mean share per question); evidence cut: the share of questions "
        "whose evidence turns (where the data names them) were not among them.",
    ]
    return "\n".join(lines) + "\n"


def _swap_row(label: str, swap: dict) -> str:
    return (f"| {label} | {swap['n']} | {swap['own_nll']:.3f} | {swap['swapped_nll']:.3f} | {swap['gap']:+.3f} "
            f"| {swap['own_better']} of {swap['n']} | {swap['own_contains']:.3f} | {swap['swapped_contains']:.3f} |")


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{share:.1%}"


def _cell_order(cell: str) -> tuple:
    """Numbers in numeric order ("3" before "10", "<1K" before "1K-4K"), beyond-window last, then by
    name; a "N facts, length" cell by its facts, then its length."""
    facts, sep, length = cell.partition(" facts, ")
    if sep and facts.isdigit():
        return (int(facts), *_cell_order(length))
    digits = "".join(ch for ch in cell.split("-")[0] if ch.isdigit())
    return (cell.startswith(">"), not cell.startswith("<"), int(digits) if digits else math.inf, cell)
