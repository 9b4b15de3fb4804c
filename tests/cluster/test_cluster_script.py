"""scripts/cluster.sh's own bookkeeping, without starting a cluster."""

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def status(folder: Path) -> str:
    done = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "status"], capture_output=True, text=True,
                          env=dict(os.environ, MEMCHAT_CLUSTER_DIR=str(folder)), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_node_killed_a_moment_ago_counts_as_stopped_so_that_up_starts_it_again(tmp_path):
    (tmp_path / "run").mkdir()
    live = subprocess.Popen(["sleep", "60"])
    killed = subprocess.Popen(["sleep", "60"])
    try:
        killed.send_signal(signal.SIGKILL)
        # not waited for: a zombie until its parent reaps it, as a killed node is until init does
        deadline = time.monotonic() + 10
        while Path(f"/proc/{killed.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / "run/web1.pid").write_text(f"{live.pid}\n")
        (tmp_path / "run/worker1.pid").write_text(f"{killed.pid}\n")
        seen = status(tmp_path)
        assert f"web1: running (pid {live.pid})" in seen
        assert "worker1: stopped" in seen and "worker2: stopped" in seen  # a zombie; no pid file
    finally:
        live.kill()
        live.wait()
        killed.wait()
