import hashlib

import pytest
import torch

from adapter_core import GenerativeAdapterModel, GeneratorConfig, StateError
from adapter_core.serving.decoding import ReplyRequest, reply
from adapter_core.memory.layer import AdapterLinear
from adapter_core.serving.sampling import SamplingConfig


def base_fingerprint(engine) -> str:
    h = hashlib.sha256()
    for name, t in engine.base_model.state_dict().items():
        if ".lora_" not in name and ".ctx_" not in name:
            h.update(name.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_untrained_generator_leaves_the_base_model_unchanged(family, make_tiny_lm, random_tokens):
    # B starts at zero, so even a non-empty memory adds nothing.
    reference = make_tiny_lm(family)
    engine = GenerativeAdapterModel(make_tiny_lm(family), GeneratorConfig(rank=4, window=8), "tiny")
    state = engine.absorb(engine.empty_state(), [random_tokens(20)])
    assert state.tokens == 20 and state.windows == 3
    assert max(s.abs().max().item() for s in state.sums.values()) > 0
    ids = torch.tensor([random_tokens(12)])
    torch.testing.assert_close(engine(ids, states=[state]).logits, reference(ids).logits, rtol=0, atol=0)


def test_absorbing_window_by_window_equals_one_call(family, make_engine, random_tokens):
    engine = make_engine(family)
    tokens = random_tokens(37)  # windows of 8: 8, 8, 8, 8, 5
    at_once = engine.absorb(engine.empty_state(), [tokens])
    one_by_one = engine.empty_state()
    for start in range(0, len(tokens), 8):
        one_by_one = engine.absorb(one_by_one, [tokens[start:start + 8]])
    assert (at_once.tokens, at_once.windows) == (one_by_one.tokens, one_by_one.windows) == (37, 5)
    assert max_diff(at_once.sums, one_by_one.sums) < 1e-4
    # Small passes (2 windows each) are the same again.
    in_pairs = engine.absorb(engine.empty_state(), [tokens], windows_per_pass=2)
    assert max_diff(at_once.sums, in_pairs.sums) < 1e-4


def test_later_windows_are_encoded_by_the_adapted_model(make_engine, random_tokens):
    # The second window's sums must depend on the first window (through the adapter) ...
    engine = make_engine("llama")
    first, second = random_tokens(8), random_tokens(8)
    after_first = engine.absorb(engine.empty_state(), [first])
    both = engine.absorb(after_first, [second])
    alone = engine.absorb(engine.empty_state(), [second])
    contribution = {k: both.sums[k] - after_first.sums[k] for k in both.sums}
    # ... except in the first adapted layer, whose input no adapter has touched yet.
    first_layer = [k for k in contribution if ".layers.0." in k]
    later = [k for k in contribution if ".layers.0." not in k]
    assert max(((contribution[k] - alone.sums[k]).abs().max().item() for k in first_layer)) < 1e-4
    assert max(((contribution[k] - alone.sums[k]).abs().max().item() for k in later)) > 1e-3


def test_text_is_tokenised_and_split_into_windows(make_engine):
    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(c) % 90 for c in text]}

    engine = make_engine("llama")
    engine.tokenizer = CharTokenizer()
    state = engine.absorb(engine.empty_state(), "hello world, again")  # 18 chars -> 8, 8, 2
    assert (state.tokens, state.windows) == (18, 3)
    same = engine.absorb(engine.empty_state(), [[3 + ord(c) % 90 for c in "hello world, again"]])
    assert max_diff(state.sums, same.sums) == 0


@pytest.mark.parametrize("empty", ["", [], [[]], ["", ""]])
def test_empty_input_is_a_no_op(make_engine, empty):
    engine = make_engine("llama")
    engine.tokenizer = lambda text, add_special_tokens=False: {"input_ids": [5] * len(text)}
    state = engine.absorb(engine.empty_state(), [[7, 8, 9]])
    after = engine.absorb(state, empty)
    assert (after.tokens, after.windows) == (state.tokens, state.windows)
    assert max_diff(after.sums, state.sums) == 0


def test_absorb_many_equals_separate_absorbs(make_engine, random_tokens):
    engine = make_engine("qwen2")
    histories = [[random_tokens(30)], [random_tokens(5)], [], [random_tokens(17), random_tokens(3)]]
    together = engine.absorb_many([engine.empty_state()] * 4, histories)
    for state, history in zip(together, histories):
        alone = engine.absorb(engine.empty_state(), history)
        assert (state.tokens, state.windows) == (alone.tokens, alone.windows)
        assert max_diff(state.sums, alone.sums) < 1e-4


def test_a_mixed_batch_equals_separate_runs(family, make_engine, random_tokens):
    engine = make_engine(family)
    alice = engine.absorb(engine.empty_state(), [random_tokens(20)])
    bob = engine.absorb(engine.empty_state(), [random_tokens(11)])
    prompts = [random_tokens(9), random_tokens(5), random_tokens(7)]
    states = [alice, None, bob]
    ids, mask = left_padded(prompts)
    batched = engine(ids, attention_mask=mask, states=states).logits
    for i, (prompt, state) in enumerate(zip(prompts, states)):
        alone = engine(torch.tensor([prompt]), states=[state]).logits[0]
        torch.testing.assert_close(batched[i, -len(prompt):], alone, rtol=1e-4, atol=1e-4)
    # and the adapters really act: Alice's row differs from the base model's
    base = engine(torch.tensor([prompts[0]])).logits[0]
    assert (batched[0, -len(prompts[0]):] - base).abs().max() > 1e-2


def test_base_weights_are_never_modified(make_engine, random_tokens):
    engine = make_engine("mistral")
    before = base_fingerprint(engine)
    state = engine.absorb(engine.empty_state(), [random_tokens(40)])
    engine(torch.tensor([random_tokens(5)]), states=[state]).logits.sum()
    reply(engine, [ReplyRequest(random_tokens(5), state, SamplingConfig.greedy(3))])
    assert base_fingerprint(engine) == before
    assert all(not p.requires_grad for n, p in engine.base_model.named_parameters()
               if ".lora_" not in n and ".ctx_" not in n)
    assert all(layer.memory is None and layer.folded is None for layer in engine.adapted.values())


def test_one_users_adapter_folded_into_a_lora_pair_equals_the_per_row_adapter(family, make_engine, random_tokens):
    engine = make_engine(family)
    alice = engine.absorb(engine.empty_state(), [random_tokens(30)])
    ids = torch.tensor([random_tokens(9)])
    with torch.no_grad():
        per_row = engine(ids.repeat(2, 1), states=[alice, alice]).logits[:1]  # two rows: a product per row
        with engine.adapters([alice]):  # one row: folded
            assert all(layer.memory is None and layer.folded is not None for layer in engine.adapted.values())
            folded = engine.base_model(input_ids=ids).logits
        torch.testing.assert_close(folded, per_row, rtol=1e-4, atol=1e-4)
        assert (folded - engine(ids).logits).abs().max() > 1e-2  # the folded adapter really acts
    assert all(layer.folded is None for layer in engine.adapted.values())


@pytest.mark.parametrize("normalization", ["svd", "polar", "frobenius"])
def test_empty_and_zero_states_give_finite_outputs_equal_to_the_base(make_engine, random_tokens, normalization):
    engine = make_engine("llama", normalization=normalization)
    ids = torch.tensor([random_tokens(7)])
    base = engine(ids).logits
    out = engine(ids, states=[engine.empty_state()]).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    state = engine.absorb(engine.empty_state(), [random_tokens(10)])
    assert all(torch.isfinite(s).all() for s in state.sums.values())
    assert torch.isfinite(engine(ids, states=[state]).logits).all()


def test_states_of_another_generator_are_refused(make_engine, random_tokens):
    engine = make_engine("llama", seed=0)
    other = make_engine("llama", seed=5)
    state = other.absorb(other.empty_state(), [random_tokens(5)])
    with pytest.raises(StateError, match="made by generator"):
        engine(torch.tensor([random_tokens(4)]), states=[state])
    with pytest.raises(StateError, match="made by generator"):
        engine.absorb(state, [random_tokens(4)])


def test_batch_and_state_counts_must_agree(make_engine, random_tokens):
    engine = make_engine("llama")
    with pytest.raises(ValueError, match="1 states for a batch of 2 rows"):
        engine(torch.tensor([random_tokens(4), random_tokens(4)]), states=[None])


def test_a_window_is_encoded_exactly_as_answering_with_the_state_so_far(family, make_engine, random_tokens):
    # The definition of streaming absorption: the sums a new window adds are those of the hidden
    # states the model produces for it when answering with the state absorbed before it.
    engine = make_engine(family)
    before = engine.absorb(engine.empty_state(), [random_tokens(16)])
    window = random_tokens(8)
    after = engine.absorb(before, [window])

    captured = {}
    layers = engine.base_model.model.layers
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
             for i, layer in enumerate(layers)]
    try:
        engine(torch.tensor([window]), states=[before])
    finally:
        for h in hooks:
            h.remove()
    for name, layer in engine.adapted.items():
        index = int(name.split(".layers.")[1].split(".")[0])
        expected = layer.context_sums(captured[index], torch.ones(1, len(window)))[0]
        torch.testing.assert_close(after.sums[name] - before.sums[name], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_reply_folds_one_user_and_leaves_the_base_weights_in_their_dtype(dtype, make_engine, random_tokens,
                                                                            monkeypatch):
    engine = make_engine("llama")
    engine.base_model.to(dtype)
    alice = engine.absorb(engine.empty_state(), [random_tokens(20)])
    folded = []
    original = AdapterLinear.folded_pair
    monkeypatch.setattr(AdapterLinear, "folded_pair", lambda self, memory: folded.append(1) or original(self, memory))
    before = base_fingerprint(engine)
    ids = torch.tensor([random_tokens(5)])
    answer = reply(engine, [ReplyRequest(ids[0].tolist(), alice, SamplingConfig.greedy(3))])[0]
    assert len(answer.tokens) == 3 and any(folded)
    assert base_fingerprint(engine) == before
    # in bf16 a pair kept apart still acts (W0 + delta W would have rounded much of it away)
    with torch.no_grad(), engine.adapters([alice]):
        adapted = engine.base_model(input_ids=ids).logits.float()
    assert (adapted - engine(ids).logits.float()).abs().max() > 1e-2
