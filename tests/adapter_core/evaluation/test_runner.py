from pathlib import Path

import pytest

from adapter_core.evaluation import runner
from adapter_core.data.dataset import read_jsonl
from adapter_core.evaluation.runner import EvalOptions, evaluate, markdown_report, summarize

EXAMPLES = Path(__file__).parents[1] / "data" / "three_examples.jsonl"
SCRIPT = {  # (mode, question) -> what the "model" answers
    ("closed_book", "What is my cat called?"): "I don't know.",
    ("closed_book", "Where do I live?"): "You live in Quenmoor.",
    ("closed_book", "What is my favourite food?"): "Pizza",
    ("closed_book", "What is my locker code?"): "1234",
    ("adapter", "What is my cat called?"): "Your cat is Tobrik!",
    ("adapter", "Where do I live?"): "Porto Velho, of course",
    ("adapter", "What is my favourite food?"): "the plum tart",
    ("adapter", "What is my locker code?"): "4812",
}


@pytest.fixture
def scripted(monkeypatch):
    def fake_generate(engine, batch, max_new_tokens):
        return [SCRIPT[(a.mode, a.conversation.questions[a.index].question)] for a in batch]
    monkeypatch.setattr(runner, "_generate", fake_generate)


def cell(summary, dimension, name, mode):
    return next(c for c in summary[dimension] if c["cell"] == name and c["mode"] == mode)


def test_known_scores_on_three_hand_written_examples(scripted, make_text_engine):
    engine = make_text_engine()
    results = evaluate(engine, list(read_jsonl(EXAMPLES)), EvalOptions(modes=("closed_book", "adapter")),
                       progress=False)
    assert len(results) == 8
    summary = summarize(results, limit=1024)
    closed, adapter = cell(summary, "all", "all", "closed_book"), cell(summary, "all", "all", "adapter")
    assert (closed["accuracy"], closed["f1"]) == (0.0, 0.0)
    assert adapter["accuracy"] == 0.75
    assert adapter["f1"] == pytest.approx((0.4 + 2 / 3 + 1.0 + 0.0) / 4)
    assert cell(summary, "facts", "1", "adapter")["accuracy"] == 1.0
    assert cell(summary, "facts", "2", "adapter")["accuracy"] == 0.5
    assert cell(summary, "length", "<1K", "adapter")["n"] == 4
    updates = {u["mode"]: u for u in summary["updates"]}
    assert (updates["closed_book"]["latest"], updates["closed_book"]["superseded"]) == (0.0, 1.0)
    assert (updates["adapter"]["latest"], updates["adapter"]["superseded"]) == (1.0, 0.0)
    assert all(r.nll > 0 for r in results)
    report = markdown_report(summary, ["closed_book", "adapter"])
    assert "| 2 | 0.000 / 0.000 /" in report and "| adapter | 1 | 1.000 | 0.000 |" in report


def test_an_untrained_adapter_scores_exactly_like_closed_book(make_text_engine):
    # B starts at zero, so the adapter changes nothing: a check that modes share prompts and scoring.
    engine = make_text_engine()
    results = evaluate(engine, list(read_jsonl(EXAMPLES)), EvalOptions(modes=("closed_book", "adapter"),
                                                                        max_new_tokens=4), progress=False)
    by_mode = {m: [r for r in results if r.mode == m] for m in ("closed_book", "adapter")}
    for a, b in zip(by_mode["closed_book"], by_mode["adapter"]):
        assert a.question == b.question and a.prediction == b.prediction
        assert a.nll == pytest.approx(b.nll, abs=1e-5)


def test_full_history_is_truncated_to_the_window_and_says_so(make_text_engine):
    engine = make_text_engine()
    conversations = list(read_jsonl(EXAMPLES))
    options = EvalOptions(modes=("full_history", "adapter_recent"), max_new_tokens=2, recent_turns=2,
                          context_limit=200)
    results = evaluate(engine, conversations, options, progress=False)
    full = [r for r in results if r.mode == "full_history"]
    assert all(r.prompt_tokens <= 200 - 2 for r in full)
    assert any(r.truncated for r in full)
    assert not any(r.truncated for r in results if r.mode == "adapter_recent")
    summary = summarize(results, 200)
    assert cell(summary, "all", "all", "full_history")["truncated"] == sum(r.truncated for r in full)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown modes"):
        EvalOptions(modes=("oracle",))
