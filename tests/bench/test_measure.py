import time

import pytest
import torch

from bench import measure


@pytest.mark.parametrize("reset_allowed", [True, False], ids=["high-water mark", "sampler"])
def test_peak_memory_sees_a_buffer_that_lived_only_inside_the_block(reset_allowed, monkeypatch):
    if not reset_allowed:
        monkeypatch.setattr(measure, "_reset_peak_resident", lambda: False)
    with measure.PeakMemory(torch.device("cpu")) as quiet:
        pass
    with measure.PeakMemory(torch.device("cpu")) as busy:
        buffer = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)  # long enough for the sampler's 2 ms period
        del buffer
    assert busy.peak > 56 * 2**20, busy.peak
    assert quiet.peak < 8 * 2**20, quiet.peak
