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
