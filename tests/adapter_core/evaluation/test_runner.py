from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapter_core.data.dataset import read_jsonl
from adapter_core.data.personas import make_eval_set
from adapter_core.evaluation import prompts, runner
from adapter_core.evaluation.answering import Answer
from adapter_core.evaluation.report import markdown_report, summarize
from adapter_core.evaluation.runner import MODES, EvalOptions, _prepare, evaluate, swap_partners

from tests.conftest import tiny_text_engine

DATA = Path(__file__).parents[1] / "data"
EXAMPLES = DATA / "three_examples.jsonl"
TWO_SPEAKERS = DATA / "two_speakers.jsonl"
SCRIPT = {  # (mode, question) -> what the "model" answers
    ("closed_book", "What is my cat called?"): "I don't know.",
    ("closed_book", "Where do I live?"): "You live in Quenmoor.",
    ("closed_book", "What is my favourite food?"): "Pizza",
    ("closed_book", "What is my locker code?"): "1234",
    ("adapter", "What is my cat called?"): "Your cat is Tobrik!",
    ("adapter", "Where do I live?"): "Porto Velho, of course",
    ("adapter", "What is my favourite food?"): "the plum tart",
    ("adapter", "What is my locker code?"): "4812",
    ("adapter", "When did Caroline go to the LGBTQ support group?"): "On May 7th, 2023.",
    ("adapter", "What is the name of the dog of the person who painted a sunrise?"): "Her dog is Luna",
    ("adapter", "What does Caroline want to study?"): "psychology",
    ("adapter", "What colour is the sky on a clear day?"): "blue",
    ("adapter", "When did I finish my screenplay?"): "In January 2022",
    ("adapter", "What is my screenplay about?"): "a lighthouse keeper",
    ("adapter", "What is the name of Nate's new turtle?"): "Pebble",
}


@pytest.fixture
def scripted(monkeypatch):
    def fake_answers(engine, batch, max_new_tokens):
        return [Answer(SCRIPT.get((a.mode, a.conversation.questions[a.index].question), "I don't know."), 1.5)
                for a in batch]
    monkeypatch.setattr(runner, "_answers", fake_answers)


def cell(summary, dimension, name, mode):
    return next(c for c in summary[dimension] if c["cell"] == name and c["mode"] == mode)


def test_known_scores_on_three_hand_written_examples(scripted, make_text_engine):
    engine = make_text_engine()
    results = evaluate(engine, list(read_jsonl(EXAMPLES)), EvalOptions(modes=("closed_book", "adapter")),
                       progress=False)
    assert len(results) == 8
    summary = summarize(results, limit=1024)
    closed, adapter = cell(summary, "all", "all", "closed_book"), cell(summary, "all", "all", "adapter")
    assert (closed["contains"], closed["f1"]) == (0.0, 0.0)
    assert adapter["contains"] == 0.75
    assert adapter["f1"] == pytest.approx((2 / 3 + 0.8 + 1.0 + 0.0) / 4)  # "your", "is", "of" do not count
    assert cell(summary, "facts", "1", "adapter")["contains"] == 1.0
    assert cell(summary, "facts", "2", "adapter")["contains"] == 0.5
    assert cell(summary, "length", "<1K", "adapter")["n"] == 4
    assert "category" not in summary  # these examples have none: no table that repeats "all"
    named_none = summarize([replace(r, category="None") for r in results], limit=1024)
    assert {c["cell"] for c in named_none["category"]} == {"None"}  # a category may be called "None"
    updates = {u["mode"]: u for u in summary["updates"]}
    assert (updates["closed_book"]["latest"], updates["closed_book"]["superseded"]) == (0.0, 1.0)
    assert (updates["adapter"]["latest"], updates["adapter"]["superseded"]) == (1.0, 0.0)
    report = markdown_report(summary, ["closed_book", "adapter"])
    assert "| 2 | adapter | 2 | 0.500 |" in report and "| adapter | 1 | 1.000 | 0.000 |" in report


def test_categories_dates_and_evidence_on_two_speaker_conversations(scripted, make_text_engine):
    results = evaluate(make_text_engine(), list(read_jsonl(TWO_SPEAKERS)), EvalOptions(modes=("closed_book", "adapter")),
                       progress=False)
    summary = summarize(results, limit=1024)
    assert {c["cell"] for c in summary["category"]} == {"temporal", "multi-hop", "single-hop", "open-domain"}
    temporal = cell(summary, "category", "temporal", "adapter")
    # "On May 7th, 2023." matches 7 May 2023; "In January 2022" is less precise than 20 January 2022
    assert (temporal["n"], temporal["dated"], temporal["date_match"], temporal["contains"]) == (2, 2, 0.5, 0.0)
    assert cell(summary, "category", "multi-hop", "adapter")["contains"] == 1.0
    assert cell(summary, "all", "all", "adapter")["dated"] == 2
    assert cell(summary, "category", "open-domain", "adapter")["date_match"] is None
    history = {h["mode"]: h for h in summary["history"]}
    assert (history["adapter"]["turns_kept"], history["adapter"]["evidence_cut"]) == (1.0, 0.0)
    assert (history["closed_book"]["turns_kept"], history["closed_book"]["evidence_cut"]) == (0.0, 1.0)
    assert history["adapter"]["with_evidence"] == 6  # the open-domain question names no evidence
    report = markdown_report(summary, ["closed_book", "adapter"])
    assert "## By question category" in report and "| temporal | adapter | 2 | 0.000 |" in report
    assert "| 0.500 (2) |" in report and "| adapter | 7 | 0 | 100.0% | 100.0% |" in report


def test_every_mode_on_two_speaker_conversations_with_a_tiny_model(tiny_tokenizer):
    engine = tiny_text_engine(tiny_tokenizer, seed=2, live=True)  # random B: adapters change answers
    conversations = list(read_jsonl(TWO_SPEAKERS))
    results = evaluate(engine, conversations, EvalOptions(modes=MODES, max_new_tokens=3, recent_turns=2),
                       progress=False)
    assert len(results) == len(MODES) * 7 and {r.mode for r in results} == set(MODES)
    assert all(r.nll > 0 and r.prompt_tokens > 0 for r in results)
    by = {(r.mode, r.question): r for r in results}
    for q in (q.question for c in conversations for q in c.questions):
        assert by[("adapter", q)].nll != pytest.approx(by[("closed_book", q)].nll)  # the adapter is used
        assert by[("full_history", q)].prompt_tokens > by[("adapter_recent", q)].prompt_tokens \
            > by[("adapter", q)].prompt_tokens == by[("closed_book", q)].prompt_tokens
    assert not any(r.truncated for r in results)
    summary = summarize(results, limit=1024)
    for dimension in ("all", "category", "length"):
        assert {c["mode"] for c in summary[dimension]} == set(MODES)
    history = {h["mode"]: h for h in summary["history"]}
    assert history["full_history"]["turns_kept"] == history["adapter_recent"]["turns_kept"] == 1.0
    assert history["full_history"]["evidence_cut"] == 0.0


def test_the_swap_test_answers_each_question_under_the_next_conversation_s_adapter(tiny_tokenizer):
    engine = tiny_text_engine(tiny_tokenizer, seed=2, live=True)
    conversations = list(read_jsonl(TWO_SPEAKERS))
    asks = _prepare(engine, conversations, swap_partners(conversations),
                    EvalOptions(modes=("adapter", "adapter_swapped")), limit=1024)
    for u, conversation in enumerate(conversations):
        partner = conversations[(u + 1) % len(conversations)]
        state = next(a.state for a in asks if a.conversation is conversation and a.mode == "adapter_swapped")
        expected = engine.absorb(engine.empty_state(), prompts.memory_text(partner, len(partner.turns)))
        assert state.tokens == expected.tokens and all(torch.equal(state.sums[k], expected.sums[k]) for k in state.sums)
    results = evaluate(engine, conversations, EvalOptions(modes=("adapter", "adapter_swapped"), max_new_tokens=2),
                       progress=False)
    swap = summarize(results, 1024)["swap_test"]
    own = {r.question: r for r in results if r.mode == "adapter"}
    swapped = [r for r in results if r.mode == "adapter_swapped"]
    assert swap["n"] == len(swapped) == len(own) == 7
    assert swap["gap"] == pytest.approx(sum(r.nll - own[r.question].nll for r in swapped) / 7) != 0
    assert swap["own_better"] == sum(own[r.question].nll < r.nll for r in swapped)
    assert "## Swap test" in markdown_report(summarize(results, 1024), ["adapter", "adapter_swapped"])
    with pytest.raises(ValueError, match="at least two conversations"):
        evaluate(engine, conversations[:1], EvalOptions(modes=("adapter_swapped",)), progress=False)


def test_full_history_is_cut_to_the_context_limit_and_says_what_it_lost(make_text_engine):
    engine = make_text_engine()
    conversations = list(read_jsonl(TWO_SPEAKERS))
    limit = 520
    results = evaluate(engine, conversations, EvalOptions(modes=("full_history", "adapter_recent"), max_new_tokens=2,
                                                          recent_turns=2, context_limit=limit), progress=False)
    full = [r for r in results if r.mode == "full_history"]
    assert any(r.truncated for r in full) and all(r.kept_turns < r.history_turns for r in full if r.truncated)
    assert all(r.prompt_tokens <= limit - 2 for r in full)
    evidence = {(c.id, q.question): [c.turn_index(s, t) for s, t in q.evidence]
                for c in conversations for q in c.questions}
    for r in full:  # the evidence is cut when a turn it names is before the turns shown
        turns = evidence[(r.conversation, r.question)]
        assert r.evidence_cut == (any(t < r.history_turns - r.kept_turns for t in turns) if turns else None)
    assert any(r.evidence_cut for r in full) and not all(r.evidence_cut for r in full if r.evidence_cut is not None)
    summary = summarize(results, limit)
    history = {h["mode"]: h for h in summary["history"]}
    with_evidence = [r for r in full if r.evidence_cut is not None]
    assert history["full_history"]["evidence_cut"] == pytest.approx(
        sum(r.evidence_cut for r in with_evidence) / len(with_evidence))
    assert history["full_history"]["truncated"] == sum(r.truncated for r in full)
    assert 0 < history["full_history"]["tokens_kept"] < 1
    assert not any(r.truncated for r in results if r.mode == "adapter_recent")
    assert cell(summary, "all", "all", "full_history")["truncated"] == sum(r.truncated for r in full)


def test_a_gold_longer_than_the_answer_budget_still_fits_the_window(make_text_engine):
    engine = make_text_engine()
    conversations = list(read_jsonl(TWO_SPEAKERS))
    limit, budget = 400, 2
    asks = _prepare(engine, conversations, swap_partners(conversations),
                    EvalOptions(modes=MODES, max_new_tokens=budget, recent_turns=4), limit)
    assert max(len(a.gold) for a in asks) > 40  # "a lighthouse keeper who collects lost letters"
    assert all(len(a.prompt) + max(budget, len(a.gold)) <= limit for a in asks)
    long_gold = [a for a in asks if len(a.gold) > 40 and a.mode == "full_history"]
    assert long_gold and all(a.truncated for a in long_gold)
    for a in long_gold:  # no more cut than needed: one more turn would not leave the gold its room
        question = a.conversation.questions[a.index].question
        more = prompts.prompt(engine.tokenizer, a.conversation, question, a.kept_turns + 1)
        assert len(more) + len(a.gold) > limit


def test_the_synthetic_heldout_set_gets_the_same_tables(make_text_engine):
    conversations = make_eval_set(seed=0, facts=[1, 3], lengths=[200], per_cell=3)
    results = evaluate(make_text_engine(), conversations,
                       EvalOptions(modes=("full_history", "adapter"), max_new_tokens=2, context_limit=400),
                       progress=False)
    summary = summarize(results, 400)
    kinds = {q.category for c in conversations for q in c.questions}
    assert {c["cell"] for c in summary["category"]} == kinds and "" not in kinds
    history = {h["mode"]: h for h in summary["history"]}
    assert history["full_history"]["with_evidence"] == len(results) // 2  # every synthetic question says where
    assert history["full_history"]["truncated"] > 0 and history["full_history"]["evidence_cut"] > 0
    assert history["adapter"]["evidence_cut"] == 0.0
    assert "## By question category" in markdown_report(summary, ["full_history", "adapter"])


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown modes"):
        EvalOptions(modes=("oracle",))
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvalOptions(max_new_tokens=0)
