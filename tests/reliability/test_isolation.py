"""Isolation beyond the app tests: passwords only as hashes, and one user's adapter holds nothing
of another user's conversation."""

from __future__ import annotations

import random

import torch
from sqlalchemy import select

from adapter_core import AdapterState
from adapter_core.conversation import Turn, history_text, left_pad, prompt_ids
from adapter_core.evaluation.metrics import contains_answer
from adapter_core.training.persona import EVAL, make_conversation
from app.worker import CompressionWorker
from storage.models import User


def test_passwords_are_stored_only_as_argon2_hashes(service, password, tmp_path):
    service.sign_up("alice", password)
    with service.storage.engine.connect() as connection:
        hashes = list(connection.execute(select(User.password_hash)).scalars())
    assert hashes and all(h.startswith("$argon2id$") and password not in h for h in hashes)
    service.storage.engine.dispose()  # flush the WAL into the file before reading it
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("memchat.db*"))
    assert raw and password.encode() not in raw


def test_bs_adapter_holds_nothing_of_a_and_recalls_no_better_than_closed_book(service, password):
    rng = random.Random(5)
    conversation_a = make_conversation(rng, EVAL, 6, 300, cid="a")
    alice, bob = service.sign_up("alice", password), service.sign_up("bob", password)
    for turn in conversation_a.turns:
        if turn.role == "user":
            list(service.reply(alice, turn.text))
    for text in ("I like trains.", "My sister is called Brenwyn.", "Tea, not coffee."):
        list(service.reply(bob, text))
    for user_id in (alice, bob):
        service.compress_now(user_id)
    worker = CompressionWorker(service, service.storage)
    while worker.run_once():
        pass

    bob_state = AdapterState.from_bytes(service.storage.read_snapshot(bob))
    bob_turns = [Turn(m.role, m.text) for m in service.storage.history(bob)]
    only_bob = service.engine.absorb(service.engine.empty_state(), history_text(bob_turns))
    assert all(torch.allclose(bob_state.sums[k], only_bob.sums[k], atol=1e-5) for k in only_bob.sums)

    tok = service.engine.tokenizer
    questions = conversation_a.questions
    ids, mask = left_pad([prompt_ids(tok, q.question) for q in questions], tok.pad_token_id)
    correct = {}
    for name, state in (("closed book", None), ("bob's adapter", bob_state)):
        out = service.engine.generate(ids, attention_mask=mask, states=None if state is None else [state] * len(ids),
                                      max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        answers = [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
        correct[name] = sum(contains_answer(a, [q.answer]) for a, q in zip(answers, questions))
    assert correct["bob's adapter"] <= correct["closed book"]
