"""The C++ layers of the CPU decode step (lean_step.cpp), built once per machine.

torch compiles the file with the machine's C++ compiler at the first start (about half a minute)
and caches the build on disk (~/.cache/torch_extensions/<Python's cache tag, e.g. cpython-311>/, or
the same under TORCH_EXTENSIONS_DIR): later starts load it at once. Used by the lean decode step (lean_decoder.NativeLayers) and by the 4-bit
products (int4.py), which lay their weights out for the module's own kernel where it is faster.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lean_step.cpp")


@functools.lru_cache(maxsize=1)
def compiled():
    """The C++ decoder layers (lean_step.cpp), built once per machine; None if they cannot be."""
    try:
        import ninja  # torch builds extensions with ninja, which must be on PATH
        from torch.utils.cpp_extension import load

        builds = _builds()
    except (ImportError, OSError, TypeError) as e:  # TypeError: a Python without a cache_tag
        log.warning("the C++ decoder layers cannot be built (%s); decoding in Python", e)
        return None
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    started = time.perf_counter()
    for folder, cflags, ldflags in builds:
        try:
            with _only_loader(folder):
                module = load(name=folder.name, sources=[str(SOURCE)],
                              extra_cflags=["-O3", "-ffp-contract=off", *cflags], extra_ldflags=ldflags,
                              build_directory=str(folder), verbose=False)
        except Exception as e:  # noqa: BLE001 - a failed build: try the next, at last the Python step decodes
            log.info("the C++ decoder layers did not build with %s (%s)", " ".join(cflags) or "no flags", e)
            continue
        log.info("C++ decoder layers ready in %.1f s (%s; AVX-512 attention: %s)",
                 time.perf_counter() - started, " ".join(cflags) or "portable", module.avx512())
        return module
    log.warning("the C++ decoder layers could not be built; decoding in Python")
    return None


def build_folders() -> list[Path]:
    """Where each build lives, the preferred first (see _builds)."""
    return [folder for folder, _, _ in _builds()]


def _builds() -> list[tuple[Path, list[str], list[str]]]:
    """(folder, compiler flags, linker flags) of each build, tried in turn until one builds."""
    from torch.utils.cpp_extension import get_default_build_root

    # -ffp-contract=off (on every build): the compiler fuses no multiply-add on its own (the rotary
    # embedding rounds as the Python step's does); -march=native: the loops are vectorized for this
    # CPU, so the build is kept per CPU (its name); -fopenmp: ATen's parallel_for shares rows and
    # heads between the threads (without it, one thread). Each build where the one before fails (a
    # compiler without -march=native or OpenMP, such as Apple's clang): slower, still correct.
    # Each build's name holds the source's hash too: two versions of the app on one machine (an
    # upgrade while the old one still runs, a second checkout) never load each other's build; and
    # the folder is per Python (the module is built for its ABI), under torch's usual root.
    version = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / sys.implementation.cache_tag
    return [(root / f"memchat_lean_step_{cpu_id()}_{version}", ["-march=native", "-fopenmp"], ["-fopenmp"]),
            (root / f"memchat_lean_step_openmp_{version}", ["-fopenmp"], ["-fopenmp"]),
            (root / f"memchat_lean_step_portable_{version}", [], [])]


@contextlib.contextmanager
def _only_loader(directory: Path):
    """Hold the build folder while torch builds or loads the module in it.

    torch's own guard is a file (`lock`) that it creates on every load, built or cached, and removes
    after; a process killed in between (kill -9 of a replica that is starting, the OOM killer)
    leaves the file behind, and every later start waits on it forever. Our lock is flock's, which
    the kernel drops with the process that held it: under it, no other process of this machine is
    loading this build, so a `lock` file found then was left by a dead one and is removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "memchat.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # waits while another process builds (half a minute at most)
        stale = directory / "lock"
        if stale.exists():
            log.warning("removing %s, left by a process that died while loading the C++ layers", stale)
            stale.unlink(missing_ok=True)
        yield


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
