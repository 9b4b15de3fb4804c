"""The second compressor: a LoRA pair per user, fine-tuned (adapter_core.memory.finetune), and rows' own
pairs served beside the generator's memories, on every decode path."""

from dataclasses import replace

import pytest
import torch

from adapter_core.serving.decoding import ReplyRequest, reply
from adapter_core.memory.finetune import FinetuneCompressor, FinetuneConfig, replay_sample
from adapter_core.serving.lean_decoder import lean_decoder
from adapter_core.memory.state import AdapterState, StateError
from adapter_core.serving.sampling import SamplingConfig

from ..serving.test_decoding import greedy_without_cache
from ..serving.test_lean_decoder import make_four_bit_engine, step_logits  # noqa: F401  (a fixture)

GREEDY = SamplingConfig.greedy(6)
FAST = FinetuneConfig(steps=4, lr=5e-2, window_tokens=32, replay_tokens=64)


def random_pairs(engine, seed: int, rank: int = 4, every: bool = False) -> AdapterState:
    """A fine-tuned state with random pairs on the upper layer's modules (or every module)."""
    gen = torch.Generator().manual_seed(seed)
    top = max(engine.layer_index.values())
    pairs = {name: (torch.randn(rank, layer.base_layer.in_features, generator=gen) * 0.3,
                    torch.randn(layer.base_layer.out_features, rank, generator=gen) * 0.3)
             for name, layer in engine.adapted.items() if every or engine.layer_index[name] == top}
    return AdapterState(sums={}, generator_id="finetune-test", base_model_id=engine.base_model_id, pairs=pairs)


def test_rows_with_their_own_pairs_a_generators_memory_or_none_each_reply_as_alone(make_engine, random_tokens):
    engine = make_engine("llama")
    alice = random_pairs(engine, 1)
    bob = engine.absorb(engine.empty_state(), [random_tokens(20)])  # a generator's state, beside them
    carol = random_pairs(engine, 2, rank=2, every=True)
    requests = [ReplyRequest(random_tokens(n), state, GREEDY)
                for n, state in ((6, alice), (3, None), (9, bob), (5, carol))]
    expected = [greedy_without_cache(engine, r) for r in requests]
    assert [list(r.tokens) for r in reply(engine, requests)] == expected
    assert expected[0] != greedy_without_cache(engine, ReplyRequest(requests[0].prompt, None, GREEDY))


def test_the_compiled_layers_take_rows_own_pairs_stacked(make_four_bit_engine, random_tokens, monkeypatch):
    engine = make_four_bit_engine()
    decoder = lean_decoder(engine)
    assert decoder.native is not None
    alice, carol = random_pairs(engine, 1), random_pairs(engine, 2, rank=2, every=True)
    bob = engine.absorb(engine.empty_state(), [random_tokens(20)])
    requests = [ReplyRequest(random_tokens(8), alice, GREEDY), ReplyRequest(random_tokens(4), None, GREEDY),
                ReplyRequest(random_tokens(6), bob, GREEDY), ReplyRequest(random_tokens(5), carol, GREEDY)]
    reference = step_logits(engine, requests, False)
    for stacked_up_to in (128, 1):  # stacked into the C++ layers, or too many: the Python step
        monkeypatch.setattr("adapter_core.serving.lean_decoder.MAX_STACKED_RANK", stacked_up_to)
        for a, b in zip(step_logits(engine, requests, True), reference):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=3e-3)


def test_a_state_with_pairs_is_stored_and_checked_like_any(make_engine):
    engine = make_engine("llama")
    state = random_pairs(engine, 3)
    again = AdapterState.from_bytes(state.to_bytes())
    assert set(again.pairs) == set(state.pairs) and again.sums == {}
    assert all(torch.equal(again.pairs[n][0], state.pairs[n][0]) and torch.equal(again.pairs[n][1], state.pairs[n][1])
               for n in state.pairs)
    damaged = bytearray(state.to_bytes())
    damaged[-3] ^= 0xFF
    with pytest.raises(StateError):
        AdapterState.from_bytes(bytes(damaged))


def nll(engine, state, text: str) -> float:
    ids = torch.tensor([engine.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = engine(ids, states=[state]).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]))


def test_fine_tuning_remembers_the_users_own_text_and_not_another_users(make_text_engine):
    engine = make_text_engine()
    compressor = FinetuneCompressor(engine, FAST)
    alice_text, bob_text = "User: my dog is called Biscuit.\n", "User: I live in Quenmoor by the sea.\n"
    alice = compressor.absorb(compressor.empty_state(), alice_text)
    bob = compressor.absorb(compressor.empty_state(), bob_text)
    assert alice.tokens == len(engine.tokenizer(alice_text, add_special_tokens=False)["input_ids"])
    base = nll(engine, None, alice_text)
    own, swapped = nll(engine, alice, alice_text), nll(engine, bob, alice_text)
    assert own < base - 0.5 and own < swapped  # the swap test, in small
    again = compressor.absorb(compressor.empty_state(), alice_text)  # deterministic
    assert all(torch.equal(again.pairs[n][1], alice.pairs[n][1]) for n in alice.pairs)
    assert set(alice.pairs) == set(compressor.modules) and alice.generator_id == compressor.id


def test_a_compression_continues_from_the_last_pairs_with_earlier_turns_replayed(make_text_engine):
    engine = make_text_engine()
    compressor = FinetuneCompressor(engine, FAST)
    first = "User: my dog is called Biscuit.\n"
    state = compressor.absorb(compressor.empty_state(), first)
    later = compressor.absorb(state, "User: the weather is fine today.\n", replay=[first])
    assert later.tokens > state.tokens and later.windows == state.windows + 1  # replay is not counted as new
    assert nll(engine, later, first) < nll(engine, None, first) - 0.5
    assert compressor.absorb(later, "") is later  # nothing new: nothing trained
    with pytest.raises(StateError):  # another compressor's state is rebuilt, not continued
        compressor.absorb(engine.empty_state(), first)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_the_lower_layers_run_once_and_the_upper_ones_give_the_models_own_logits(make_engine, random_tokens, family):
    """Training runs the frozen layers below first_layer once per window: the upper part, started
    from their output, must give what the whole model gives, with the pairs applied."""
    engine = make_engine(family, shape=dict(num_hidden_layers=4))
    compressor = FinetuneCompressor(engine, FinetuneConfig(upper_layers=0.5))
    assert 0 < compressor.first_layer < 4
    state = random_pairs(engine, 3, every=True)
    params = {name: (a, b / compressor.config.scaling) for name, (a, b) in state.pairs.items() if name in compressor.modules}
    trained = AdapterState(sums={}, generator_id="t", base_model_id=engine.base_model_id,
                           pairs={name: (a, b * compressor.config.scaling) for name, (a, b) in params.items()})
    ids = torch.tensor([random_tokens(12)])
    with torch.no_grad():
        split = compressor._logits(compressor._lower(ids[0].tolist(), None), params, None)
        whole = engine(ids, states=[trained]).logits[0].float()
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)


def test_the_loss_counts_the_users_lines_and_the_replies_stay_context(make_text_engine):
    engine = make_text_engine()
    compressor = FinetuneCompressor(engine, FinetuneConfig(window_tokens=16))
    text = "User: my dog\nis Biscuit.\nAssistant: Nice!\nUser: bye\n"  # a user's turn of two lines
    ids, counted = compressor._tokens(text)
    tok = engine.tokenizer
    assert tok.decode([i for i, c in zip(ids, counted) if c]) == "User: my dog\nis Biscuit.\nUser: bye\n"
    windows = compressor._windows([text])
    assert all(counted[16 * n + i + 1] for n, w in enumerate(windows) for i in w.taught)
    assert sum(len(w.taught) for w in windows) == sum(c for i, c in enumerate(counted) if i % 16)  # a window's first token has no context
    named = "Alice: my dog is Biscuit.\nBob: Nice!\n"  # no user lines: every token counts
    assert all(compressor._tokens(named)[1])
    everything = FinetuneCompressor(engine, FinetuneConfig(loss_on="all"))._tokens(text)
    assert all(everything[1]) and everything[0] == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="loss_on"):
        FinetuneConfig(loss_on="assistant")


def test_steps_take_every_window_while_they_fit_else_passes_over_a_seeded_shuffle(make_text_engine):
    engine = make_text_engine()
    compressor = FinetuneCompressor(engine, FinetuneConfig(steps=8, window_tokens=32, batch_tokens=128, min_passes=2))
    assert compressor._batches(3) == [[0, 1, 2]] * 8  # a short compression: all of it at every step
    batches = compressor._batches(42)  # 4 windows a step, each window twice: two passes of 11 steps
    assert len(batches) == 22 and all(len(b) == len(set(b)) for b in batches) and max(map(len, batches)) == 4
    seen = [i for b in batches for i in b]
    assert all(seen.count(i) == 2 for i in range(42))
    assert len(compressor._batches(10)) == 9  # 3 steps a pass: passes until `steps` steps are taken
    assert batches == compressor._batches(42)  # seeded: the same history trains the same way
    with pytest.raises(ValueError, match="batch_tokens"):
        FinetuneConfig(window_tokens=256, batch_tokens=128)


def test_a_long_compression_recomputes_the_frozen_layers_and_trains_the_same(make_text_engine, monkeypatch):
    engine = make_text_engine()
    compressor = FinetuneCompressor(engine, FinetuneConfig(steps=2, lr=5e-2, window_tokens=16, batch_tokens=32))
    text = "User: my dog is called Biscuit and he sleeps all day.\n" * 3
    kept = compressor.absorb(compressor.empty_state(), text)
    monkeypatch.setattr("adapter_core.memory.finetune.LOWER_KEPT_WINDOWS", 0)  # nothing kept: recomputed at each use
    again = compressor.absorb(compressor.empty_state(), text)
    assert all(torch.equal(kept.pairs[n][1], again.pairs[n][1]) for n in kept.pairs)


def test_the_replay_sample_is_bounded_seeded_and_in_order(tiny_tokenizer):
    texts = [f"turn {i} " * 3 for i in range(20)]
    chosen = replay_sample(texts, 60, tiny_tokenizer, seed=1)
    assert sum(len(tiny_tokenizer(t)["input_ids"]) for t in chosen) <= 60 and chosen
    assert chosen == replay_sample(texts, 60, tiny_tokenizer, seed=1) != replay_sample(texts, 60, tiny_tokenizer, seed=2)
    assert chosen == [t for t in texts if t in chosen]


def test_the_anchor_keeps_the_base_models_own_text_as_it_was(make_text_engine):
    """The anchor loss (KL to the base model on text it wrote itself) holds what the adapter changes
    elsewhere: with it, the adapted model's NLL of that text stays nearer the base model's."""
    from adapter_core.evaluation.leakage import perplexity

    engine = make_text_engine()
    text = "User: my dog is called Biscuit and he sleeps all day.\n" * 3
    drift = {}
    for weight in (0.0, 20.0):
        compressor = FinetuneCompressor(engine, FinetuneConfig(steps=6, lr=5e-2, window_tokens=64, anchor_weight=weight,
                                                               anchor_tokens=64))
        state = compressor.absorb(compressor.empty_state(), text)
        anchor_text = engine.tokenizer.decode(compressor.anchor().ids[0])
        drift[weight] = abs(perplexity(engine, state, anchor_text) / perplexity(engine, None, anchor_text) - 1)
    assert drift[20.0] < drift[0.0]
    with pytest.raises(ValueError, match="anchor_weight"):
        FinetuneConfig(anchor_weight=-1)


def test_recall_chats_of_the_users_statements_are_trained_beside_the_chat(make_text_engine, monkeypatch):
    engine = make_text_engine()
    text = "User: my dog is called Biscuit.\nAssistant: Nice!\nUser: what is up?\n"
    config = FinetuneConfig(steps=2, lr=5e-2, window_tokens=512, batch_tokens=512, recall="both")
    compressor = FinetuneCompressor(engine, config)
    monkeypatch.setattr(compressor, "_write", lambda prompts, pause=None: [" What is my dog called?\nAnswer: Biscuit"] * len(prompts))
    (window,) = compressor._recall_windows([text])
    taught = engine.tokenizer.decode([window.ids[i + 1] for i in window.taught], skip_special_tokens=True)
    assert "You told me: Your dog is called Biscuit." in taught and "Biscuit. You told me" in taught
    assert "what is up" not in engine.tokenizer.decode(window.ids)  # a question is no statement
    trained = []
    monkeypatch.setattr(compressor, "_loss", lambda w, *a: trained.append(w) or torch.zeros((), requires_grad=True))
    state = compressor.absorb(compressor.empty_state(), text)
    assert window in trained and state.tokens == len(engine.tokenizer(text)["input_ids"])  # counts the chat only
    plain = FinetuneCompressor(engine, replace(config, recall="none"))
    monkeypatch.setattr(plain, "_loss", lambda w, *a: trained.append(w) or torch.zeros((), requires_grad=True))
    trained.clear()
    plain.absorb(plain.empty_state(), text)
    assert trained and window not in trained and plain.id != compressor.id  # the setting is part of the id
    with pytest.raises(ValueError, match="recall"):
        FinetuneConfig(recall="all")
