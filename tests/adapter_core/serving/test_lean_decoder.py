"""The lean decode step computes what the transformers model computes, adapters included."""

import pytest
import torch

from adapter_core.serving import int4
from adapter_core.serving.decoding import DecodeBatch, ReplyRequest, reply
from adapter_core.serving.int4 import quantize_for_decoding
from adapter_core.serving.lean_decoder import lean_decoder
from adapter_core.serving.native import compiled
from adapter_core.serving.sampling import SamplingConfig

from .test_decoding import three_requests  # noqa: F401  (a fixture)
from .test_int4 import KERNELS, kernel_chosen, snap_to_q4_1_grid

GREEDY = SamplingConfig.greedy(6)


def step_logits(engine, requests, lean: bool, steps: int = 4) -> list[torch.Tensor]:
    """The logits every decode step chose from, (B, V) each, on the lean or the transformers path."""
    batch = DecodeBatch(engine, lean=lean)
    batch.join(requests)  # the prefill is the same code on both paths
    seen = []
    choose = batch._choose

    def recording(rows, logits):
        seen.append(logits.clone())
        choose(rows, logits)

    batch._choose = recording
    for _ in range(steps):
        batch.step()
    return seen


def test_a_batch_with_one_adapter_per_row_steps_as_the_transformers_model(three_requests):
    engine, requests = three_requests
    assert lean_decoder(engine) is not None
    lean, reference = step_logits(engine, requests, True), step_logits(engine, requests, False)
    assert len(lean) == len(reference) == 4
    for a, b in zip(lean, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_one_users_folded_adapter_steps_as_the_transformers_model(three_requests):
    engine, requests = three_requests
    alone = [requests[0]]
    lean, reference = step_logits(engine, alone, True), step_logits(engine, alone, False)
    for a, b in zip(lean, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    base = step_logits(engine, [ReplyRequest(requests[0].prompt, None, GREEDY)], True)
    assert (lean[0] - base[0]).abs().max() > 1e-2  # the adapter acts on the lean path


def test_replies_through_both_paths_are_the_same_tokens(three_requests):
    engine, requests = three_requests
    lean = reply(engine, requests)
    batch = DecodeBatch(engine, lean=False)
    rows = batch.join(requests)
    while batch.rows:
        batch.leave([r for r in batch.rows if r.finish])
        if batch.rows:
            batch.step()
    assert [list(r.tokens) for r in lean] == [r.tokens for r in rows]
    assert all(len(r.tokens) == r.request.sampling.max_new_tokens for r in rows)


def test_several_adapted_modules_in_one_fused_product_each_add_their_own(make_engine, random_tokens, family):
    engine = make_engine(family, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))
    alice = engine.absorb(engine.empty_state(), [random_tokens(16)])
    for requests in ([ReplyRequest(random_tokens(5), alice, GREEDY)],  # folded
                     [ReplyRequest(random_tokens(5), alice, GREEDY), ReplyRequest(random_tokens(8), None, GREEDY)]):
        for a, b in zip(step_logits(engine, requests, True), step_logits(engine, requests, False)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.fixture
def make_four_bit_engine(make_engine):
    """Tiny Llamas whose linear layers are on the Q4_1 grid and decode in 4 bits, as the default model's."""
    if not int4.kernel_available():
        pytest.skip("this torch build has no CPU int4 kernel")

    def make(**config):
        engine = snap_to_q4_1_grid(make_engine("llama", **config))
        quantize_for_decoding(engine.base_model)
        return engine
    return make


@pytest.fixture
def four_bit_engine(make_four_bit_engine):
    return make_four_bit_engine()


def test_4_bit_layers_are_fused_and_decode_as_the_transformers_4_bit_path(four_bit_engine, random_tokens):
    engine = four_bit_engine
    decoder = lean_decoder(engine)
    assert all(layer.qkv.packed is not None and layer.gate_up.packed is not None for layer in decoder.layers)
    state = engine.absorb(engine.empty_state(), [random_tokens(20)])
    requests = [ReplyRequest(random_tokens(5), state, GREEDY), ReplyRequest(random_tokens(9), None, GREEDY)]
    for a, b in zip(step_logits(engine, requests, True), step_logits(engine, requests, False)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # both bf16 products on the same grid


def test_beyond_a_sliding_window_the_transformers_model_decodes(make_engine, random_tokens):
    engine = make_engine("mistral")
    engine.base_model.config.sliding_window = 12
    decoder = lean_decoder(engine)
    assert decoder.applies(12) and not decoder.applies(13)
    request = ReplyRequest(random_tokens(8), None, SamplingConfig.greedy(10))
    expected = []
    for _ in range(10):  # the reference: full forwards, the window applied by the model's own mask
        with torch.no_grad():
            logits = engine(torch.tensor([list(request.prompt) + expected])).logits[0, -1]
        expected.append(int(logits.argmax()))
    assert list(reply(engine, [request])[0].tokens) == expected


def test_no_lean_step_where_it_does_not_apply(make_engine):
    engine = make_engine("llama")
    engine.base_model.to(torch.float64)
    assert lean_decoder(engine) is None


@pytest.mark.parametrize("shape", [
    None,  # head_dim 8: the portable loops
    # head_dim 16 and 32 (AVX-512 registers where the CPU has them), query heads per kv head 12 (8 + 4) and 3
    dict(hidden_size=192, intermediate_size=384, num_attention_heads=12, num_key_value_heads=1),
    dict(hidden_size=192, intermediate_size=384, num_attention_heads=6, num_key_value_heads=2),
])
@pytest.mark.parametrize("kernel", KERNELS)  # the 4-bit products: torch's, ours (where built)
def test_the_compiled_layers_compute_what_the_python_step_does(make_four_bit_engine, random_tokens, shape, kernel,
                                                               monkeypatch):
    with kernel_chosen(kernel, monkeypatch):
        engine = make_four_bit_engine(shape=shape)
        lean_decoder(engine)  # its fused products laid out for the kernel
    assert int4.own_layout(engine.base_model) == (kernel == "own")
    decoder = lean_decoder(engine)
    native = decoder.native
    assert native is not None  # 4-bit products, SiLU, adapters on o_proj and down_proj: the common case
    alice = engine.absorb(engine.empty_state(), [random_tokens(20)])
    bob = engine.absorb(engine.empty_state(), [random_tokens(12)])
    for requests in ([ReplyRequest(random_tokens(6), alice, GREEDY)],  # one user's folded pairs
                     [ReplyRequest(random_tokens(6), None, GREEDY)],  # no adapter
                     # rows of several lengths (padding masked), each with its memory or none; 70 columns:
                     # the kernels' vectorized sums, not only their remainders
                     [ReplyRequest(random_tokens(66), alice, GREEDY), ReplyRequest(random_tokens(4), None, GREEDY),
                      ReplyRequest(random_tokens(6), bob, GREEDY)]):
        compiled = step_logits(engine, requests, True)
        decoder.native = None
        try:
            python = step_logits(engine, requests, True)
        finally:
            decoder.native = native
        assert len(compiled) == 4
        for a, b in zip(compiled, python):
            # fp32 summed in another order: where a value lies near a bf16 rounding boundary (the
            # 4-bit products' inputs), the two round it apart, ~1e-3 on these logits (of ~1)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=3e-3)


@pytest.mark.parametrize("config", [dict(target_modules=("o_proj",)), dict(layers=(0, 2))])
def test_adapters_on_part_of_the_layers_decode_in_python(make_four_bit_engine, random_tokens, config):
    engine = make_four_bit_engine(**config)
    assert lean_decoder(engine).native is None  # the C++ layers adapt o and down of every layer
    state = engine.absorb(engine.empty_state(), [random_tokens(20)])
    request = ReplyRequest(random_tokens(6), state, GREEDY)
    for a, b in zip(step_logits(engine, [request], True), step_logits(engine, [request], False)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_the_kernels_exp_and_bf16_rounding_are_torch_s():  # the C++ layers' own arithmetic
    module = compiled()
    if module is None:
        pytest.skip("no C++ compiler here: the Python step decodes")
    x = torch.cat([torch.linspace(-100, 0, 200_001), torch.tensor([-87.0, -87.01, -86.99, -0.0, float("-inf")])])
    # within 2e-7 relative; below e^-87 (where floats go subnormal) 0
    torch.testing.assert_close(module.exp_nonpositive(x), torch.exp(x), rtol=2e-7, atol=1e-37)
    assert module.exp_nonpositive(torch.tensor([float("nan")])).isnan().all()  # not hidden as a tiny weight
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(200_000, generator=generator) * torch.logspace(-40, 38, 200_000)
    halfway = (torch.arange(1, 2001, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)  # ties: to even
    values = torch.cat([values, halfway, torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 3.4e38, 1e-40])])
    assert torch.equal(module.to_bf16(values).view(torch.int16), values.to(torch.bfloat16).view(torch.int16))
    assert module.to_bf16(torch.tensor([float("nan")])).isnan().all()  # a NaN (torch's bits vary by kernel)
