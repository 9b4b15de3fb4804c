"""The C++ layers of the CPU decode step (lean_step.cpp), built once per machine.

torch compiles the file with the machine's C++ compiler at the first start (about half a minute)
and caches the build on disk (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR): later starts
load it at once. Used by the lean decode step (lean_decoder.NativeLayers) and by the 4-bit
products (int4.py), which lay their weights out for the module's own kernel where it is faster.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def compiled():
    """The C++ decoder layers (lean_step.cpp), built once per machine; None if they cannot be."""
    try:
        import ninja  # torch builds extensions with ninja, which must be on PATH
        from torch.utils.cpp_extension import load
    except ImportError as e:
        log.warning("the C++ decoder layers cannot be built (%s); decoding in Python", e)
        return None
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    source = str(Path(__file__).with_name("lean_step.cpp"))
    # -ffp-contract=off: the compiler fuses no multiply-add on its own (the rotary embedding rounds
    # as the Python step's does); -march=native: the loops are vectorized for this CPU, so the build
    # is kept per CPU (its name); -fopenmp: ATen's parallel_for shares rows and heads between the
    # threads (without it, one thread). Each build where the one before fails (a compiler without
    # -march=native or OpenMP, such as Apple's clang): slower, still correct.
    # Each build's name holds the source's hash too: two versions of the app on one machine (an
    # upgrade while the old one still runs, a second checkout) never load each other's build.
    version = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:10]
    builds = [(f"memchat_lean_step_{cpu_id()}_{version}", ["-march=native", "-fopenmp"], ["-fopenmp"]),
              (f"memchat_lean_step_openmp_{version}", ["-fopenmp"], ["-fopenmp"]),
              (f"memchat_lean_step_portable_{version}", [], [])]
    started = time.perf_counter()
    for name, cflags, ldflags in builds:
        try:
            module = load(name=name, sources=[source], extra_cflags=["-O3", "-ffp-contract=off", *cflags],
                          extra_ldflags=ldflags, verbose=False)
        except Exception as e:  # noqa: BLE001 - a failed build: try the next, at last the Python step decodes
            log.info("the C++ decoder layers did not build with %s (%s)", " ".join(cflags) or "no flags", e)
            continue
        log.info("C++ decoder layers ready in %.1f s (%s; AVX-512 attention: %s)",
                 time.perf_counter() - started, " ".join(cflags) or "portable", module.avx512())
        return module
    log.warning("the C++ decoder layers could not be built; decoding in Python")
    return None


def cpu_id() -> str:
    """A short name for this CPU's instruction sets (a home directory shared by other machines
    keeps one build per CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    # the instruction sets' line (x86: flags, ARM: Features); not the whole file, whose MHz change
    described = next((line for line in lines if line.lower().startswith(("flags", "features"))),
                     f"{platform.machine()} {platform.processor()}")
    return hashlib.sha256(described.encode()).hexdigest()[:10]
