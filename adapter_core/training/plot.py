"""The training curve as a picture: loss per objective and held-out results over steps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def _smooth(values: list[float], span: int = 25) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= span:
            total -= values[i - span]
        out.append(total / min(i + 1, span))
    return out


def plot_training(log: list[dict], path: str | Path) -> None:
    losses = defaultdict(lambda: ([], []))
    evals = []
    for entry in log:
        if "loss" in entry:
            steps, values = losses[entry["objective"]]
            steps.append(entry["step"])
            values.append(entry["loss"])
        if "eval_accuracy" in entry:
            evals.append(entry)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for objective, (steps, values) in sorted(losses.items()):
        left.plot(steps, _smooth(values), label=objective)
    left.set(title="training loss (moving average)", xlabel="step", ylabel="cross-entropy")
    if losses:
        left.legend()
    if evals:
        steps = [e["step"] for e in evals]
        right.plot(steps, [e["eval_accuracy"] for e in evals], "o-", color="tab:green", label="accuracy")
        swapped = [e for e in evals if "eval_nll_swapped" in e]  # runs logged before the swap test have none
        if swapped:
            right.plot([e["step"] for e in swapped], [e["eval_accuracy_swapped"] for e in swapped], "o:",
                       color="tab:olive", label="accuracy, another user's adapter")
        right.set(title="held-out recall (adapter mode; dotted: another user's adapter)", xlabel="step",
                  ylabel="accuracy", ylim=(0, 1))
        twin = right.twinx()
        twin.plot(steps, [e["eval_nll"] for e in evals], "s--", color="tab:red", label="answer NLL")
        if swapped:  # the gap between the two NLLs is memory of the user; format learning lowers both
            twin.plot([e["step"] for e in swapped], [e["eval_nll_swapped"] for e in swapped], "s:",
                      color="tab:purple", label="answer NLL, another user's adapter")
        twin.set_ylabel("answer NLL")
        right.legend(loc="upper left")
        twin.legend(loc="upper right")
    else:
        right.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
