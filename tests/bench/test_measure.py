import mmap
import time

import pytest
import torch

from bench import measure

PAGE = mmap.PAGESIZE


def touch_new_memory(size: int) -> mmap.mmap:
    """Fresh pages straight from the kernel: a malloc'd buffer could reuse memory that is already resident."""
    buffer = mmap.mmap(-1, size)
    for offset in range(0, size, PAGE):
        buffer[offset] = 1
    return buffer


@pytest.mark.parametrize("reset_allowed", [True, False], ids=["high-water mark", "sampler"])
def test_peak_memory_sees_a_buffer_that_lived_only_inside_the_block(reset_allowed, monkeypatch):
    if not reset_allowed:
        monkeypatch.setattr(measure, "_reset_peak_resident", lambda: False)
    with measure.PeakMemory(torch.device("cpu")) as quiet:
        pass
    with measure.PeakMemory(torch.device("cpu"), interval=0.001) as busy:
        buffer = touch_new_memory(64 * 2**20)
        if not reset_allowed:
            time.sleep(0.05)  # several sampling periods while the buffer lives
        buffer.close()
    assert busy.peak > 56 * 2**20, busy.peak
    assert quiet.peak < 8 * 2**20, quiet.peak


def test_flops_of_a_4_bit_layer_are_those_of_the_fp32_one():
    from adapter_core.serving.int4 import Int4Linear, kernel_available, quantize_int4

    if not kernel_available():
        pytest.skip("this torch build has no CPU int4 kernel")
    base = torch.nn.Linear(64, 48, bias=False).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.arange(64).remainder(16).expand(48, 64) * 0.01 - 0.08)  # on a 4-bit grid
    layer = Int4Linear(base, quantize_int4(base.weight))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert measure.count_flops(lambda: layer(x)) == measure.count_flops(lambda: base(x)) == 2 * 6 * 64 * 48
