"""The C++ layers' build: a process killed while loading it does not stop the next start."""

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_core.serving import native

REPO = Path(__file__).resolve().parents[3]


def test_the_build_folder_is_held_by_one_loader_at_a_time_and_a_left_over_lock_is_removed(tmp_path):
    (tmp_path / "lock").touch()  # torch's lock file, as a process killed while loading leaves it
    with native._only_loader(tmp_path):
        assert not (tmp_path / "lock").exists()
        with open(tmp_path / "memchat.flock") as second, pytest.raises(BlockingIOError):
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another loader must wait
    with open(tmp_path / "memchat.flock") as second:
        fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once the load is done


def plant_lock(folder: Path, present: bool) -> None:
    """Make or remove torch's lock file as a dead loader leaves it, under our own lock (no loader runs then)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "memchat.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (folder / "lock").touch() if present else (folder / "lock").unlink(missing_ok=True)


def test_a_start_after_a_loader_was_killed_mid_load_loads_the_layers():
    if native.compiled() is None:
        pytest.skip("no C++ compiler here: the Python step decodes")
    # what kill -9 of a starting replica leaves: torch's lock file in the build's folder. Before the
    # fix every later start waited on it forever; planted under our own lock, as no loader runs then
    for folder in native.build_folders():
        plant_lock(folder, True)
    try:
        started = subprocess.run(
            [sys.executable, "-c", "from adapter_core.serving.native import compiled; assert compiled() is not None"],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-2000:]
        assert not (native.build_folders()[0] / "lock").exists()
    finally:  # the fallback builds' folders, which that start did not need to load
        for folder in native.build_folders():
            plant_lock(folder, False)
