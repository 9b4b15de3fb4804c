"""Timers, a peak-memory sampler and a FLOP counter that work on the CPU as well as on CUDA."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

_PAGE = os.sysconf("SC_PAGE_SIZE")
_CLEAR_REFS = "/proc/self/clear_refs"


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_resident_bytes() -> int:
    """The kernel's high-water mark of this process's resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_resident() -> bool:
    """Restart the high-water mark at the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator counter, or on the CPU the kernel's
    resident high-water mark, reset at entry. Where that reset is refused, RSS is sampled by a
    thread instead; the sampler competes with the measured code for the interpreter (about 10%
    on a 2-core machine), so timings should not be taken inside such a block."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.peak = device, interval, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = resident_bytes()
        self._thread = None
        if _reset_peak_resident():
            return self
        self._high = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._high = max(self._high, resident_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif self._thread is None:
            self.peak = max(0, peak_resident_bytes() - self._base)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, resident_bytes()) - self._base


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each case, running the cases in turn on every round, so that a slow
    phase of a shared machine hits all of them alike rather than whichever ran then."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def _product_flops(x_shape, *_, out_shape, **__) -> int:
    """A 4-bit product (torch's or ours) does the multiply-adds of the fp32 one: (M, K) x (K, N)."""
    return 2 * x_shape[0] * x_shape[1] * out_shape[-1]


def _extra_flop_formulas() -> dict:
    """PyTorch's counter knows the dense matmuls only; decoding on 4-bit weights
    (adapter_core.serving.int4) runs torch's kernel or ours, which exists once the C++ layers are loaded."""
    formulas = {torch.ops.aten._weight_int4pack_mm_for_cpu: _product_flops}
    try:
        formulas[torch.ops.memchat.q4_product] = _product_flops
    except (AttributeError, RuntimeError):  # not loaded in this process: nothing runs it
        pass
    return formulas


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        fn()
    return counter.get_total_flops()
