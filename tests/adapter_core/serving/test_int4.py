import contextlib
import os

import pytest
import torch
from torch import nn

from adapter_core.serving import int4
from adapter_core.serving.int4 import MAX_ROWS, Int4Linear, quantize_for_decoding, quantize_int4

pytestmark = pytest.mark.skipif(not int4.kernel_available(), reason="this torch build has no CPU int4 kernel")
KERNELS = ["torch", *(["own"] if int4.own_kernel_built() else [])]


@pytest.fixture(params=KERNELS, autouse=True)
def kernel(request, monkeypatch):
    """Every test on torch's kernel and on ours (where it is built): each lays out its own weights."""
    with kernel_chosen(request.param, monkeypatch):
        yield request.param


@contextlib.contextmanager
def kernel_chosen(kernel: str, monkeypatch):
    """4-bit weights laid out (and products run) for `kernel` while inside."""
    before = os.environ.get("MEMCHAT_INT4_KERNEL")
    monkeypatch.setenv("MEMCHAT_INT4_KERNEL", kernel)
    int4.own_kernel.cache_clear()
    try:
        yield
    finally:
        if before is None:
            monkeypatch.delenv("MEMCHAT_INT4_KERNEL")
        else:
            monkeypatch.setenv("MEMCHAT_INT4_KERNEL", before)
        int4.own_kernel.cache_clear()  # the next caller reads the setting as it was


def on_q4_1_grid(weight: torch.Tensor, group: int = 32) -> torch.Tensor:
    """The weight rounded the way GGUF's Q4_1 stores it: per 32 inputs, q * d + m with fp16 d and m."""
    d_out, d_in = weight.shape
    groups = weight.float().reshape(d_out, d_in // group, group)
    low = groups.amin(-1, keepdim=True).half().float()
    step = ((groups.amax(-1, keepdim=True) - low) / 15).half().float()
    q = ((groups - low) / step).round().clamp(0, 15)
    return (q * step + low).reshape(d_out, d_in)


def q4_1_linear(d_in: int, d_out: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(on_q4_1_grid(linear.weight))
    return linear.requires_grad_(False)


def test_a_q4_1_weight_is_recovered_to_bf16_precision():
    base = q4_1_linear(96, 64)
    layer = Int4Linear(base, quantize_int4(base.weight), max_rows=96)
    with torch.no_grad():
        recovered = (layer(torch.eye(96)) - base.bias).T  # (d_out, d_in): the kernel's own weight
    error = (recovered - base.weight).abs().max()
    step = (base.weight.amax() - base.weight.amin()) / 15
    assert error < 0.1 * step  # bf16 rounding (scale, offset, output); another grid would be off by ~step / 2


def test_each_kernel_lays_out_its_own_weights(kernel):
    packed, scales = quantize_int4(q4_1_linear(64, 48).weight)
    if kernel == "own":  # nibbles (N, G, 16), d and m (N, G, 2) fp16
        assert (packed.shape, packed.dtype, scales.shape, scales.dtype) == ((48, 2, 16), torch.uint8, (48, 2, 2), torch.float16)
    else:
        assert packed.dim() == 2 and scales.shape == (2, 48, 2) and scales.dtype == torch.bfloat16


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])  # tiles of 4 rows and each remainder
def test_our_kernel_sums_exactly_where_nothing_rounds(rows):
    """Integer weights, and inputs that are integers times a power of two per group, each group
    reaching 127 times it (its int8 scale is then that power of two, a different one in each row and
    group, so a scale read from the wrong place shows): every sum is exact in fp32, so the product
    must equal the exact one, bit for bit."""
    if not int4.own_kernel_built():
        pytest.skip("our kernel is not built here (no AVX2)")
    torch.manual_seed(rows)
    d_out, d_in = 40, 96  # 40 outputs: more than one chunk of 16, and a remainder
    q = torch.randint(0, 16, (d_out, d_in // 32, 32), dtype=torch.uint8)
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).contiguous()
    d = torch.randint(1, 4, (d_out, d_in // 32)).float()
    m = torch.randint(-3, 4, (d_out, d_in // 32)).float()
    x = torch.randint(-127, 128, (rows, d_in)).float()
    x[:, ::32] = 127  # each group's largest magnitude
    x *= (2.0 ** torch.randint(-3, 4, (rows, d_in // 32))).repeat_interleave(32, dim=1)
    weight = (q.double() * d[..., None].double() + m[..., None].double()).reshape(d_out, d_in)
    exact = x.double() @ weight.T
    got = torch.ops.memchat.q4_product(x, nibbles, torch.stack([d, m], -1).half().contiguous())
    assert got.dtype == torch.float32 and torch.equal(got.double(), exact)


def test_our_kernel_keeps_a_nan_and_takes_a_vanishing_group_as_zeros():
    if not int4.own_kernel_built():
        pytest.skip("our kernel is not built here (no AVX2)")
    nibbles = torch.full((16, 2, 16), 0x31, dtype=torch.uint8)  # q = 1 and 3
    dm = torch.tensor([0.5, 0.0]).half().expand(16, 2, 2).contiguous()  # w = 0.5 and 1.5: a group of ones sums to 32
    x = torch.ones(3, 64)
    x[0, 5] = float("nan")  # row 0: NaN, as any product of a NaN
    x[1, :32] = 1e-39  # row 1: a group below the smallest normal float counts as zeros
    got = torch.ops.memchat.q4_product(x, nibbles, dm)
    assert got[0].isnan().all()
    assert got[1].tolist() == [32.0] * 16  # its second group only
    assert got[2].tolist() == [64.0] * 16


def test_few_rows_run_on_4_bits_at_bf16_precision():
    base = q4_1_linear(96, 64)
    layer = Int4Linear(base, quantize_int4(base.weight))
    x = torch.randn(3, 5, 96)  # 15 rows <= max_rows
    with torch.no_grad():
        y, exact = layer(x), base(x)
    assert y.shape == exact.shape == (3, 5, 64)
    assert not torch.equal(y, exact)  # the 4-bit kernel ran, not the fp32 weight
    assert (y - exact).norm() / exact.norm() < 1e-2


def test_many_rows_and_training_use_the_fp32_weight_exactly():
    base = q4_1_linear(64, 32)
    layer = Int4Linear(base, quantize_int4(base.weight), max_rows=4)
    many = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(layer(many), base(many))
    one = torch.randn(1, 64, requires_grad=True)
    out = layer(one)  # gradients are on: the kernel has none, so the fp32 path runs
    assert torch.equal(out, base(one))
    out.sum().backward()
    torch.testing.assert_close(one.grad, base.weight.sum(0, keepdim=True))


def test_the_layer_shares_the_original_parameters():
    base = q4_1_linear(64, 32)
    layer = Int4Linear(base, quantize_int4(base.weight))
    assert layer.weight is base.weight and layer.bias is base.bias
    assert list(layer.state_dict()) == list(base.state_dict())  # the 4-bit copy is never saved


def test_only_layers_that_are_4_bit_already_and_fit_the_kernel_are_replaced():
    torch.manual_seed(0)
    model = nn.Sequential(q4_1_linear(96, 64), nn.Linear(64, 32), q4_1_linear(32, 40), nn.ReLU())
    assert quantize_int4(model[1].weight) is None  # plain fp32 weights would lose precision
    assert quantize_for_decoding(model) == ["0"]  # [2] has 40 outputs: the kernel packs them by 16
    assert type(model[0]) is Int4Linear and type(model[1]) is nn.Linear and type(model[2]) is nn.Linear


def test_a_bf16_model_is_refused():
    model = nn.Sequential(q4_1_linear(64, 32)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 weights on the CPU"):
        quantize_for_decoding(model)


def snap_to_q4_1_grid(engine):
    """The engine with its base model's linear layers on the Q4_1 grid, as the default model's file has them."""
    with torch.no_grad():
        for name, module in engine.base_model.named_modules():
            if type(module) is nn.Linear and not name.rsplit(".", 1)[-1].startswith(("lora_", "ctx_")):
                module.weight.copy_(on_q4_1_grid(module.weight))
    return engine


def test_a_4_bit_engine_decodes_like_the_fp32_one_and_its_adapter_still_acts(make_engine, random_tokens):
    engine = snap_to_q4_1_grid(make_engine("llama"))
    replaced = quantize_for_decoding(engine.base_model)
    assert len(replaced) == 3 * 7  # q, k, v, o, gate, up, down in 3 layers; lm_head (97 outputs) stays
    alice = engine.absorb(engine.empty_state(), [random_tokens(30)])
    ids = torch.tensor([random_tokens(6)])

    def last_logits(states, max_rows):
        for layer in replaced:
            engine.base_model.get_submodule(layer).max_rows = max_rows
        logits = []
        with torch.no_grad(), engine.adapters(states):
            past = None
            for t in range(ids.shape[1]):  # one token at a time, as decoding does
                out = engine.base_model(input_ids=ids[:, t:t + 1], cache=past, use_cache=True)
                past = out.past_key_values  # the filled cache
                logits.append(out.logits[0, -1])
        return torch.stack(logits)  # (T, vocab)

    adapted_4bit, adapted_fp32 = last_logits([alice], MAX_ROWS), last_logits([alice], 0)
    assert not torch.equal(adapted_4bit, adapted_fp32)
    assert (adapted_4bit - adapted_fp32).norm() / adapted_fp32.norm() < 2e-2
    plain = last_logits(None, MAX_ROWS)
    assert (adapted_4bit - plain).abs().max() > 10 * (adapted_4bit - adapted_fp32).abs().max()


def on_q8_0_grid(weight: torch.Tensor, group: int = 32) -> torch.Tensor:
    """The weight rounded the way GGUF's Q8_0 stores it: per 32 inputs, q * d with q in -127..127, fp16 d."""
    d_out, d_in = weight.shape
    groups = weight.float().reshape(d_out, d_in // group, group)
    step = (groups.abs().amax(-1, keepdim=True) / 127).half().float()
    return ((groups / step).round().clamp(-128, 127) * step).reshape(d_out, d_in)


def test_a_q8_0_weight_is_two_4_bit_halves_of_the_same_product():
    torch.manual_seed(0)
    weight = on_q8_0_grid(torch.randn(48, 64))
    packed, scales = int4.quantize_q8_as_int4(weight)
    x = torch.randn(3, 64)
    y = int4.matmul(x.repeat(1, 2), packed, scales, 32).float()
    exact = x @ weight.T
    assert (y - exact).norm() / exact.norm() < 1e-2  # bf16 inputs and scales (torch's), int8 inputs (ours)
    assert int4.quantize_q8_as_int4(torch.randn(48, 64)) is None  # not on an 8-bit grid: nothing rounded
