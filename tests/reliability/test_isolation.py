"""Isolation beyond the app tests: passwords only as hashes, and one user's adapter holds nothing
of another user's conversation."""

from __future__ import annotations

import random

import torch
from sqlalchemy import select

from adapter_core import AdapterState
from adapter_core.data.conversation import Turn, history_text, prompt_ids
from adapter_core.data.personas import EVAL, make_conversation
from adapter_core.serving.decoding import ReplyRequest, reply
from adapter_core.evaluation.metrics import contains_answer
from adapter_core.serving.sampling import SamplingConfig
from storage.models import User
from tests.app.helpers import chat, run_jobs


def test_passwords_are_stored_only_as_argon2_hashes(services, password, tmp_path):
    services.accounts.sign_up("alice", password)
    with services.storage.engine.connect() as connection:
        hashes = list(connection.execute(select(User.password_hash)).scalars())
    assert hashes and all(h.startswith("$argon2id$") and password not in h for h in hashes)
    services.storage.engine.dispose()  # flush the WAL into the file before reading it
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("memchat.db*"))
    assert raw and password.encode() not in raw


def test_bs_adapter_holds_nothing_of_a_and_recalls_no_better_than_closed_book(services, password):
    rng = random.Random(5)
    conversation_a = make_conversation(rng, EVAL, 6, 300, cid="a")
    alice, bob = services.accounts.sign_up("alice", password).account.id, services.accounts.sign_up("bob", password).account.id
    for turn in conversation_a.turns:
        if turn.role == "user":
            chat(services, alice, turn.text)
    for text in ("I like trains.", "My sister is called Brenwyn.", "Tea, not coffee."):
        chat(services, bob, text)
    for user_id in (alice, bob):
        services.memory.compress_now(user_id)
    run_jobs(services)

    engine = services.engine
    bob_state = AdapterState.from_bytes(services.storage.read_snapshot(bob))
    bob_turns = [Turn(m.role, m.text) for m in services.storage.history(bob)]
    only_bob = engine.absorb(engine.empty_state(), history_text(bob_turns))
    assert all(torch.allclose(bob_state.sums[k], only_bob.sums[k], atol=1e-5) for k in only_bob.sums)

    questions = conversation_a.questions
    greedy = SamplingConfig.greedy(12)
    correct = {}
    for name, state in (("closed book", None), ("bob's adapter", bob_state)):
        answers = reply(engine, [ReplyRequest(prompt_ids(engine.tokenizer, q.question), state, greedy)
                                 for q in questions])
        correct[name] = sum(contains_answer(a.text, [q.answer]) for a, q in zip(answers, questions))
    assert correct["bob's adapter"] <= correct["closed book"]
