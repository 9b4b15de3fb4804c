"""Many users through the load balancer (issue 24): one process against the cluster of docs/deploy.md.

The same workload runs against these setups, in this order, each started as its users would start it:

* one process: `app.py` (--role all: SQLite, rate limits in the process, adapter snapshots in files),
  no load balancer, as `make run` serves;
* the cluster with two web replicas: `scripts/cluster.sh up` (PostgreSQL, Redis, adapter snapshots
  in the database, two compression workers, HAProxy in front), all on this machine's cores;
* the same cluster with one web replica (`scripts/cluster.sh stop web2`; measured once HAProxy
  sends everything to web1);
* one process again, a new one: the spread between its two runs is this machine's own noise.

Workload, the same in each: `users` users, each with an API key made on the page. All of them send a
first message at once (not timed: it warms up each process's batches), then each user's turns are
compressed into an adapter (--compressor generator: quick, and the replies then read that adapter's
snapshot), then every user sends `rounds` messages through the OpenAI-compatible API, each after the
reply to the one before: streamed, greedy, replies of exactly `reply_tokens` tokens (ignore_eos,
bench.clients). Every setup has users of its own with the same messages, so it answers the same prompts.

Then one of them sends `alone_replies` more, one after another, with nobody else chatting. Each of
those is the same prompt in every setup (the same turns before it), one turn longer than the one
before, so replies are compared in pairs: what the shared state and the load balancer cost per reply
is the median, over the alone replies, of the cluster's one replica's whole reply over the one
process's same reply (the mean of its two runs), less one. The two one-process runs compared the same
way give this machine's own noise, reported beside it. (The p50 ratio with everyone at once is
reported too; there, how the batches happen to form moves it by more than 5% between two runs of the
same setup.)

`python -m bench` runs it last; alone (the other sections' figures left as they are):

  python -m bench.replicas --out docs/bench/replicas     # replicas.json, replicas.md, replicas.png
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client

from app.openai_api import ADAPTER_HEADER, MODEL_ID

from .clients import WAIT_S, ApiUser, at_once, compress_now, streamed_reply
from .sections import BenchOptions
from .servers import ROOT, AppFlags, app_env, free_port_base, one_process

CLUSTER = ROOT / "scripts" / "cluster.sh"
PASSWORD = "bench password 42"
CLUSTER_PORT_OFFSETS = (0, 1, 2, 10, 20)
"""scripts/cluster.sh's ports from MEMCHAT_CLUSTER_PORT: HAProxy, web1, web2, Redis, PostgreSQL."""
REPLICA_COOKIE = "memchat_replica"
"""HAProxy's cookie naming the replica that answered (deploy/haproxy.cfg): which one served each reply."""
ONE_PROCESS, TWO_REPLICAS, ONE_REPLICA = "one process", "cluster, 2 web replicas", "cluster, 1 web replica"


@dataclass(frozen=True)
class _Reply:
    first_token_s: float
    total_s: float
    prompt_tokens: int
    tokens: int
    replica: str
    """Which replica answered: HAProxy's cookie; "direct" without a load balancer."""
    adapter_version: str


def replicas(cache_dir: Path, flags: AppFlags, options: BenchOptions) -> dict:
    """The setups' figures; {"skipped": why} where the cluster's programs are missing and cannot be
    installed (not root), {"failed": why} where a setup failed (its processes' logs are kept, and
    named). Every process loads the model converted in `cache_dir`."""
    missing = [c for c in ("haproxy", "redis-server", "curl") if shutil.which(c) is None]
    if not glob("/usr/lib/postgresql/*/bin/postgres"):
        missing.append("postgresql")
    if missing and os.geteuid() != 0:
        return {"skipped": f"the cluster needs {', '.join(missing)} (scripts/cluster.sh installs them as root)"}
    # not under a private temporary folder: PostgreSQL's own user must reach its data inside
    folder = Path(tempfile.mkdtemp(prefix="memchat-bench-replicas-"))
    os.chmod(folder, 0o755)
    env = app_env()
    args = flags.args(options.replicas_reply_tokens)
    rows = []
    try:
        with one_process(folder / "one", cache_dir.resolve(), args, env) as url:
            rows.append(_workload(url, ONE_PROCESS, "one", options))
        with _cluster(folder / "cluster", cache_dir.resolve(), args, env) as (url, stop_web2):
            rows.append(_workload(url, TWO_REPLICAS, "two", options))
            stop_web2()
            rows.append(_workload(url, ONE_REPLICA, "single", options))
        with one_process(folder / "again", cache_dir.resolve(), args, env) as url:
            rows.append(_workload(url, ONE_PROCESS, "again", options))
    except Exception as e:  # noqa: BLE001 - the other sections' figures are kept; this one says why
        return {"failed": f"{type(e).__name__}: {e} (logs in {folder})"}
    shutil.rmtree(folder, ignore_errors=True)
    one_replica = next(r for r in rows if r["setup"] == ONE_REPLICA)
    first, again = (np.array(r["alone_reply_s"]) for r in rows if r["setup"] == ONE_PROCESS)
    by_one_process = (first + again) / 2
    return {"users": options.replicas_users, "rounds": options.replicas_rounds,
            "reply_tokens": options.replicas_reply_tokens, "alone_replies": options.replicas_alone_replies,
            "rows": rows,
            "shared_state_cost_p50": float(np.median(np.array(one_replica["alone_reply_s"]) / by_one_process)) - 1,
            "one_process_spread_p50": float(np.median(again / first)) - 1,
            "shared_state_cost_p50_all_at_once": one_replica["reply_p50_s"] / float(np.mean(
                [r["reply_p50_s"] for r in rows if r["setup"] == ONE_PROCESS])) - 1}


def _workload(url: str, setup: str, prefix: str, options: BenchOptions) -> dict:
    """Keys, the untimed first message and the compression, then the timed rounds; the figures."""
    names = [f"{prefix}{i}" for i in range(options.replicas_users)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # a Gradio client each: not all at once
        keys = list(pool.map(lambda name: _new_key(url, name), names))
    users = [ApiUser(url, key) for key in keys]
    try:
        at_once(users, lambda i, user: _reply(user, f"Hello, I am user {i}.", options.replicas_reply_tokens))
        compress_now(url, keys)
        replies, wall = at_once(users, lambda i, user: [
            _reply(user, f"User {i} here; this is my message number {r}.", options.replicas_reply_tokens)
            for r in range(options.replicas_rounds)])
        alone = [_reply(users[0], f"Only me now, message {r}.", options.replicas_reply_tokens)
                 for r in range(options.replicas_alone_replies)]
    finally:
        for user in users:
            user.close()
    done = [r for rounds in replies for r in rounds]
    first, total = [r.first_token_s for r in done], [r.total_s for r in done]
    tokens = sum(r.tokens for r in done)
    return {"setup": setup, "replies": len(done), "tokens": tokens, "prompt_tokens": sum(r.prompt_tokens for r in done),
            "seconds": wall, "tokens_per_s": tokens / wall,
            "replicas_seen": sorted({r.replica for r in done}),
            "adapter_versions_seen": sorted({r.adapter_version for r in done}),
            "first_token_p50_s": float(np.percentile(first, 50)), "first_token_p95_s": float(np.percentile(first, 95)),
            "reply_p50_s": float(np.percentile(total, 50)), "reply_p95_s": float(np.percentile(total, 95)),
            "alone_reply_p50_s": float(np.percentile([r.total_s for r in alone], 50)),
            "alone_reply_s": [r.total_s for r in alone], "alone_prompt_tokens": [r.prompt_tokens for r in alone]}


def _reply(user: ApiUser, text: str, tokens: int) -> _Reply:
    """One message and its whole streamed reply, and who answered it."""
    reply = streamed_reply(user, [{"role": "user", "content": text}], tokens, MODEL_ID)
    return _Reply(reply.first_token_s, reply.total_s, reply.prompt_tokens, reply.tokens,
                  user.http.cookies.get(REPLICA_COOKIE, "direct"), reply.headers.get(ADAPTER_HEADER, "?"))


def _new_key(url: str, name: str) -> str:
    """Sign up on the page and make an API key there, as a person would (through a load balancer,
    the page's requests keep to the replica its cookie names)."""
    cookies = dict(httpx.get(url, timeout=WAIT_S).cookies)  # the load balancer's replica cookie, if any
    signed = httpx.post(url + "auth/signup", json={"username": name, "password": PASSWORD}, cookies=cookies,
                        timeout=WAIT_S)
    signed.raise_for_status()
    cookies.update(signed.cookies)
    page = Client(url, verbose=False, headers={"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())})
    try:
        shown = str(page.submit(name, "UTC", api_name="/create_api_key").result(timeout=WAIT_S))
    finally:
        page.close()
    made = re.search(r"sk-mc-[\w-]+", shown)
    if made is None:
        raise RuntimeError(f"no API key made for {name}: {shown[:200]}")
    return made[0]


@contextmanager
def _cluster(folder: Path, cache: Path, args: list[str], env: dict[str, str]):
    """scripts/cluster.sh's cluster, its data in `folder`: its address, and a function that stops its
    second replica and returns once HAProxy sends every request to the first."""
    folder.mkdir(parents=True)
    os.chmod(folder, 0o755)
    (folder / "model-cache").symlink_to(cache)
    port = free_port_base(CLUSTER_PORT_OFFSETS)
    url = f"http://127.0.0.1:{port}/"
    env = env | {"MEMCHAT_CLUSTER_DIR": str(folder), "MEMCHAT_CLUSTER_PORT": str(port),
                 "MEMCHAT_CLUSTER_APP": f"{sys.executable} {ROOT / 'app.py'}", "MEMCHAT_CLUSTER_ARGS": " ".join(args)}

    def cluster(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER), *command], env=env, capture_output=True, text=True,
                              timeout=WAIT_S)

    def stop_web2() -> None:
        done = cluster("stop", "web2")
        if done.returncode != 0:
            raise RuntimeError(f"scripts/cluster.sh stop web2: {done.stderr[-2000:]}")
        # until HAProxy's health checks mark it down: before, a request sent there is retried on
        # web1 after a failed connection, which would be timed too
        deadline, log = time.monotonic() + WAIT_S, folder / "logs" / "haproxy.log"
        while "replicas/web2 is DOWN" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("HAProxy did not mark the stopped web2 down")
            time.sleep(0.2)

    try:
        done = cluster("up")
        if done.returncode != 0:
            raise RuntimeError(f"scripts/cluster.sh up: {done.stderr[-2000:]}")
        yield url, stop_web2
    finally:
        cluster("down")  # whatever happened: no process left behind


def main(argv: list[str] | None = None) -> dict:
    from .__main__ import section_alone
    from .report import plot_replicas, replicas_markdown
    return section_alone(__doc__, "replicas", lambda args: replicas(args.cache_dir, AppFlags.of(args), BenchOptions()),
                         plot_replicas, replicas_markdown, argv)


if __name__ == "__main__":
    main()
