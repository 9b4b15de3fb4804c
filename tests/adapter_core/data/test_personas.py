import random
import re

import pytest

from adapter_core.data.conversation import history_text
from adapter_core.data.personas import EVAL, KINDS, TRAIN, is_heldout_value, make_conversation, make_eval_set


def templates(split: str) -> set[str]:
    out = set()
    for kind in KINDS:
        p = kind.phrasings(split)
        out |= set(p.statements) | set(p.questions) | set(p.updates)
    return out


def as_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{v}"), ".+") + "$")


@pytest.fixture(scope="module")
def samples():
    rng = random.Random(7)
    train = [make_conversation(rng, TRAIN, rng.choice([1, 3, 6, 10]), 300, 0.5) for _ in range(300)]
    evaluation = make_eval_set(seed=3, facts=[1, 3, 6, 10], lengths=[300], per_cell=60)
    return train, evaluation


def test_at_least_twelve_kinds_with_separate_phrasings_per_split():
    assert len(KINDS) >= 12
    assert len({k.name for k in KINDS}) == len(KINDS)
    assert sum(k.updatable for k in KINDS) >= 6
    for kind in KINDS:
        for split in (TRAIN, EVAL):
            p = kind.phrasings(split)
            assert p.statements and p.questions, kind.name
            assert bool(p.updates) == kind.updatable, kind.name
    assert not templates(TRAIN) & templates(EVAL)


def test_heldout_values_never_occur_in_training(samples):
    train, evaluation = samples
    train_text = "\n".join(history_text(c.turns) + "".join(q.question for q in c.questions) for c in train).lower()
    eval_values = {v for c in evaluation for q in c.questions for v in [q.answer, *q.superseded]}
    assert len(eval_values) > 200  # 240 questions plus superseded values
    assert all(is_heldout_value(v) for v in eval_values)
    assert not any(is_heldout_value(q.answer) for c in train for q in c.questions)
    leaked = [v for v in eval_values if re.search(r"\b" + re.escape(v.lower()) + r"\b", train_text)]
    assert not leaked


def test_heldout_phrasings_never_occur_in_training(samples):
    train, evaluation = samples
    eval_patterns = [as_regex(t) for t in templates(EVAL)]
    train_lines = [t.text for c in train for t in c.turns if t.role == "user"] + \
                  [q.question for c in train for q in c.questions]
    assert not [line for line in train_lines if any(p.match(line) for p in eval_patterns)]
    # and the held-out set really uses them
    eval_questions = {q.question for c in evaluation for q in c.questions}
    assert eval_questions <= {q for k in KINDS for q in k.eval.questions}


def test_values_are_diverse_enough_that_only_copying_works(samples):
    train, _ = samples
    answers = [q.answer for c in train for q in c.questions]
    assert len(set(answers)) / len(answers) > 0.9


def test_updates_make_the_latest_value_the_answer(samples):
    train, evaluation = samples
    updated = [(c, q) for c in train + evaluation for q in c.questions if q.superseded]
    assert len(updated) > 50
    for conversation, q in updated:
        text = history_text(conversation.turns)
        positions = [text.find(v) for v in [*q.superseded, q.answer]]
        assert all(p >= 0 for p in positions)
        assert positions == sorted(positions), (q, positions)


def test_sessions_facts_chit_chat_and_length(samples):
    train, evaluation = samples
    for c in train[:50]:
        assert len(c.sessions) >= 1
        assert len(c.questions) == c.meta["n_facts"]
        assert len(c.turns) > 2 * (c.meta["n_facts"] + c.meta["updates"])  # chit-chat between facts
        assert len(history_text(c.turns)) // 4 >= 300 * 0.8
    assert max(len(c.sessions) for c in train) >= 3
    cells = {(c.meta["n_facts"], c.meta["target_tokens"]) for c in evaluation}
    assert cells == {(1, 300), (3, 300), (6, 300), (10, 300)}
    for cell in cells:
        assert sum(len(c.questions) for c in evaluation if (c.meta["n_facts"], c.meta["target_tokens"]) == cell) >= 60


def test_the_same_seed_gives_the_same_set():
    a = make_eval_set(seed=1, facts=[3], lengths=[200], per_cell=9)
    b = make_eval_set(seed=1, facts=[3], lengths=[200], per_cell=9)
    assert [x.to_json() for x in a] == [x.to_json() for x in b]
