"""Memory: compression (incremental, idle, on demand), forgetting and rebuilding, damaged adapter
files, the worker's failures, and each user's own data only."""

import time
from dataclasses import replace

import pytest
import torch

from adapter_core import AdapterState
from adapter_core.data.conversation import Turn, history_text
from app.errors import AccessDenied, Gone
from app.worker import CompressionWorker
from tests.app.helpers import chat, run_jobs
from tests.storage.helpers import transactions


def absorbed(services, messages) -> AdapterState:
    """What the engine makes of these messages from an empty state."""
    engine = services.engine
    return engine.absorb(engine.empty_state(), history_text([Turn(m.role, m.text) for m in messages]))


def same_state(a: AdapterState, b: AdapterState) -> bool:
    return a.sums.keys() == b.sums.keys() and all(torch.allclose(a.sums[k], b.sums[k], atol=1e-5) for k in a.sums)


def test_compression_after_n_messages_moves_turns_from_prompt_to_adapter(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "My cat is called Tobrik.")
    assert services.memory.status(uid).job is None  # 1 user message < compress_every (2)
    chat(services, uid, "I live in Quenmoor.")
    assert services.memory.status(uid).job.status == "queued"
    run_jobs(services)
    status = services.memory.status(uid)
    assert (status.adapter_version, status.pending_messages, status.absorbed_messages) == (1, 0, 4)
    assert status.last_compression is not None and not status.needs_rebuild
    assert all(m.absorbed for m in services.chat.history(uid))
    _, finished = chat(services, uid, "What is my cat called?")
    assert finished.stats.adapter_version == 1 and finished.stats.pending_turns == 1
    # the stored state is exactly the absorption of the four turns (on the inference loop, in slices)
    stored = AdapterState.from_bytes(services.storage.read_snapshot(uid))
    assert same_state(stored, absorbed(services, services.storage.history(uid)[:4]))


def test_incremental_compression_reads_only_new_turns(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    for text in ("one", "two", "three", "four"):
        chat(services, uid, text)
        run_jobs(services)
    snapshots = services.storage.list_snapshots(uid)
    assert [s.version for s in snapshots] == [1, 2]
    assert snapshots[1].stats["messages"] == 4  # the second compression absorbed only the 4 new turns
    history = services.storage.history(uid)
    expected = services.engine.absorb(absorbed(services, history[:4]),
                                      history_text([Turn(m.role, m.text) for m in history[4:]]))
    assert same_state(AdapterState.from_bytes(services.storage.read_snapshot(uid)), expected)


def test_compression_on_the_inference_loop_is_bit_for_bit_what_the_app_absorbed_before(services, password):
    """Before the inference loop, the service called engine.absorb(state, text, windows_per_pass=4)
    itself; the loop runs that same call (stepping aside between layers for replies), so the
    adapter is the same, bit for bit."""
    uid = services.accounts.sign_up("alice", password).account.id
    long = "I keep a diary of every walk I take along the river, with the birds I saw. " * 3
    for text in (long, "two", long, "four"):
        chat(services, uid, text)
    run_jobs(services)
    text = history_text([Turn(m.role, m.text) for m in services.storage.history(uid)])
    engine = services.engine
    assert len(engine.windows_of(text)) > 4  # several passes
    stored = AdapterState.from_bytes(services.storage.read_snapshot(uid))
    before = engine.absorb(engine.empty_state(), text, windows_per_pass=4)
    assert all(torch.equal(stored.sums[k], before.sums[k]) for k in before.sums)


def test_idle_trigger_and_compress_now_queue_compression(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "just one message")
    services.settings.compress_idle_seconds = 60
    assert services.memory.queue_idle(time.time()) == []  # too recent
    assert services.memory.queue_idle(time.time() + 61) == [uid]
    run_jobs(services)
    assert services.memory.status(uid).adapter_version == 1
    chat(services, uid, "another one")
    services.memory.compress_now(uid)
    assert services.memory.status(uid).job.status == "queued"
    with pytest.raises(AccessDenied):
        services.memory.compress_now(None)


def test_forgetting_a_message_rebuilds_the_adapter_without_it(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "My secret code is 4821.")
    chat(services, uid, "I like tea.")
    run_jobs(services)
    secret = services.chat.history(uid)[0]
    assert services.memory.forget(uid, secret.id) == 2  # the message and the reply to it
    assert services.chat.history(uid)[0].text == "I like tea."
    assert services.memory.status(uid).needs_rebuild
    # until the rebuild lands, answers use no adapter (the old one may still hold the message) and
    # show the turns it held instead
    _, finished = chat(services, uid, "What is my code?")
    assert finished.stats.adapter_version is None and finished.stats.pending_turns == 3
    run_jobs(services)
    remaining = services.storage.history(uid)
    assert "4821" not in " ".join(m.text for m in remaining)
    assert same_state(AdapterState.from_bytes(services.storage.read_snapshot(uid)), absorbed(services, remaining))
    assert [s.version for s in services.storage.list_snapshots(uid)] == [2]  # the old snapshot is gone
    assert services.storage.list_snapshots(uid)[0].stats["rebuild"] is True


def test_a_failing_compression_is_retried_and_visible(services, password, monkeypatch):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "a")
    chat(services, uid, "b")
    monkeypatch.setattr(services.memory.loop, "absorb",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    assert CompressionWorker(services.memory).run_once()
    job = services.memory.status(uid).job
    assert job.status == "queued" and job.attempts == 1 and "disk on fire" in job.error


def _queued_user(services, password) -> int:
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "My cat is called Tobrik.")
    chat(services, uid, "I live in Quenmoor.")
    assert services.memory.status(uid).job.status == "queued"
    return uid


def test_a_long_compression_renews_its_lease_so_no_other_worker_takes_its_job(services, password, monkeypatch):
    monkeypatch.setattr(services.storage, "settings", replace(services.storage.settings, job_lease_s=0.3))
    uid = _queued_user(services, password)
    absorb, asked = services.memory.loop.absorb, []

    def slow(*args, **kwargs):
        time.sleep(1.0)  # three leases long: only the renewals keep the job
        asked.append(services.storage.claim_job())  # another worker looks for work meanwhile
        return absorb(*args, **kwargs)

    monkeypatch.setattr(services.memory.loop, "absorb", slow)
    assert services.memory.run_due_job()
    assert asked == [None]
    assert services.memory.status(uid).adapter_version == 1 and services.memory.status(uid).job is None


def test_a_worker_that_stalled_past_its_lease_stores_nothing_and_the_job_finishes_elsewhere(services, password,
                                                                                         monkeypatch):
    monkeypatch.setattr(services.storage, "settings", replace(services.storage.settings, job_lease_s=0.3))
    monkeypatch.setattr(services.storage, "renew_lease", lambda claim: True)  # stalled: never renews
    uid = _queued_user(services, password)
    absorb, other = services.memory.loop.absorb, []

    def stalled(*args, **kwargs):
        time.sleep(0.5)
        other.append(services.storage.claim_job())  # another worker takes the job over
        return absorb(*args, **kwargs)

    monkeypatch.setattr(services.memory.loop, "absorb", stalled)
    assert services.memory.run_due_job()
    assert services.storage.list_snapshots(uid) == []  # the stalled run's result was refused
    job = services.memory.status(uid).job
    assert job.status == "running" and job.attempts == 2 and other[0].attempts == 2  # the other worker's run
    monkeypatch.setattr(services.memory.loop, "absorb", absorb)
    assert services.memory.compress(uid, other[0].claim) == 1  # the worker that took it over
    services.storage.finish_job(other[0].id, other[0].claim)
    assert [s.version for s in services.storage.list_snapshots(uid)] == [1]
    assert services.memory.status(uid).job is None


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_a_damaged_adapter_file_is_served_around_reported_and_rebuilt(services, password, damage):
    admin = services.accounts.ensure_admin("root", password).id
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "a")
    chat(services, uid, "b")
    run_jobs(services)
    snapshot = services.storage.latest_snapshot(uid)
    path = services.storage.files.data_dir / snapshot.path
    path.write_bytes(b"garbage") if damage == "garbage" else path.unlink()
    services.memory.drop_state(uid)
    with transactions(services.storage) as begun:
        _, finished = chat(services, uid, "c")
    assert len(begun) == 3  # the turn's two, and the report
    assert finished.stats.adapter_version is None  # served without the adapter
    assert finished.stats.pending_turns == 5  # and with the turns it held in the prompt instead
    event = services.admin.audit(admin)[0]
    assert (event.action, event.user) == ("adapter_unreadable", "alice")
    assert services.memory.status(uid).needs_rebuild
    run_jobs(services)  # the rebuild was queued by the detection itself
    _, finished = chat(services, uid, "d")
    assert finished.stats.adapter_version == 2
    assert [e.action for e in services.admin.audit(admin)].count("adapter_unreadable") == 1


def test_users_only_ever_forget_their_own_messages(services, password):
    alice, bob = services.accounts.sign_up("alice", password).account.id, services.accounts.sign_up("bob", password).account.id
    chat(services, alice, "Alice's secret")
    chat(services, alice, "more")
    run_jobs(services)
    assert "Alice's secret" not in repr(services.chat.history(bob))
    alice_message = services.chat.history(alice)[0].id
    for guess in (alice_message, "not a number", -1, None):
        with pytest.raises(Gone, match="That no longer exists, or is not yours"):
            services.memory.forget(bob, guess)
    assert services.chat.history(alice)[0].id == alice_message
    assert services.memory.status(bob).messages == 0


def test_forgetting_everything_rebuilds_an_empty_adapter(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "forget me")
    services.memory.compress_now(uid)
    run_jobs(services)
    services.memory.forget(uid, services.chat.history(uid)[0].id)
    run_jobs(services)
    status = services.memory.status(uid)
    assert (status.adapter_version, status.messages, status.needs_rebuild) == (2, 0, False)
    assert AdapterState.from_bytes(services.storage.read_snapshot(uid)).tokens == 0


# --- the fine-tuning compressor (--compressor finetune, the default) ----------------------------

@pytest.fixture
def finetuning(services, monkeypatch):
    """The services with the fine-tuning compressor, cut to a few cheap steps for the tiny model."""
    from adapter_core.memory.finetune import FinetuneCompressor, FinetuneConfig

    services.memory.compressor = FinetuneCompressor(
        services.engine, FinetuneConfig(steps=3, lr=5e-2, window_tokens=64, replay_tokens=64))
    return services


def two_turns_compressed(services, password) -> int:
    """A new user, alice, whose first two turns are compressed; her id."""
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "My cat is called Tobrik.")
    chat(services, uid, "I live in Quenmoor.")
    run_jobs(services)
    return uid


def test_the_finetune_compressor_writes_pairs_replays_earlier_turns_and_serves_them(finetuning, password):
    services = finetuning
    uid = two_turns_compressed(services, password)
    first = services.storage.latest_snapshot(uid)
    assert first.generator_id == services.memory.compressor.id and first.stats["compressor"] == "finetune"
    assert first.stats["replayed_turns"] == 0  # nothing earlier to replay
    state = AdapterState.from_bytes(services.storage.read_snapshot(uid))
    assert state.pairs and not state.sums
    chat(services, uid, "My bike is green.")
    chat(services, uid, "It rains today.")
    run_jobs(services)
    second = services.storage.latest_snapshot(uid)
    assert second.version == 2 and second.stats["replayed_turns"] > 0
    assert second.stats["new_tokens"] < second.tokens_absorbed  # trained on the new turns (and a replay), not all
    _, finished = chat(services, uid, "What is my cat called?")
    assert finished.stats.adapter_version == 2  # answered with the fine-tuned pairs
    from app.ui import _memory_markdown

    status = services.memory.status(uid)
    assert (status.compressor, status.compression_tokens) == ("finetune", second.stats["new_tokens"])
    shown = _memory_markdown(status, "UTC")
    assert f"v2, fine-tuned on {second.stats['new_tokens']} new tokens in " in shown
    admin = services.accounts.ensure_admin("root", password).id
    summary = services.admin.adapter_summary(admin, uid)
    assert any(row.delta_norm > 0 for row in summary)  # the upper layers' pairs, on the admin page


def test_switching_compressors_rebuilds_the_adapter_from_the_history(finetuning, password):
    from adapter_core.memory.compressor import GeneratorCompressor

    services = finetuning
    uid = two_turns_compressed(services, password)
    services.memory.compressor = GeneratorCompressor(services.engine)
    services.memory.drop_state(uid)
    chat(services, uid, "And my dog is Biscuit.")  # the fine-tuned snapshot is not this compressor's
    run_jobs(services)
    latest = services.storage.latest_snapshot(uid)
    assert latest.generator_id == services.engine.generator_id and latest.stats.get("rebuild")
    assert latest.stats["messages"] == 6  # the whole history, absorbed anew
    actions = [e.action for e in services.storage.list_audit(target_user_id=uid)]
    assert "adapter_outdated" in actions and "adapter_unreadable" not in actions  # not called damaged


def test_a_running_compression_shows_its_progress_on_the_memory_tab_and_the_admin_page(finetuning, password,
                                                                                        monkeypatch):
    import threading

    from app.ui import _memory_markdown

    services = finetuning
    compressor = services.memory.compressor
    at_step, go_on = threading.Event(), threading.Event()
    absorb = compressor.absorb

    def slow_absorb(state, texts, replay=(), pause=None, progress=None):
        def told(done, steps):
            progress(done, steps)
            if done == 1:  # after the first step: look at the page now
                at_step.set()
                go_on.wait(30)
        return absorb(state, texts, replay, pause, told)

    monkeypatch.setattr(compressor, "absorb", slow_absorb)
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "My cat is called Tobrik.")
    chat(services, uid, "I live in Quenmoor.")
    worker = threading.Thread(target=run_jobs, args=(services,))
    worker.start()
    try:
        assert at_step.wait(60)
        status = services.memory.status(uid)
        assert (status.progress.steps_done, status.progress.steps) == (1, 3)
        shown = _memory_markdown(status, "UTC")
        assert "**Compression**: running now, step 1 of 3, " in shown and "s left" in shown
        admin = services.accounts.ensure_admin("root", password).id
        assert services.admin.user(admin, uid).status.progress.steps_done == 1
    finally:
        go_on.set()
        worker.join(60)
    assert services.memory.status(uid).progress is None and services.memory.status(uid).adapter_version == 1
