"""The many-machines topology, as real processes (scripts/cluster.sh): PostgreSQL, Redis, two web
replicas, two compression workers and HAProxy in front, each on a loopback port. The memchat
processes run the app's own start-up (tests/cluster/node.py) on the tiny model the other tests use.

What a person sees when the load balancer sends them to any replica: one login, one set of limits,
one download link, one adapter; and what survives `kill -9` of a replica or a worker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client

from app.openai_api import MODEL_ID
from bench.replicas import CLUSTER_PORT_OFFSETS
from bench.servers import free_port_base

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "a good password 42"
LEASE_S = 6.0
"""The compression jobs' and the turns' leases in this cluster (120 s and 30 s by default): short, so
that the faults' tests wait little, yet long enough for a busy machine's renewals (a third of it)."""


@dataclass
class Cluster:
    folder: Path
    port: int
    env: dict[str, str]

    def url(self, node: str = "lb") -> str:
        return f"http://127.0.0.1:{self.port + {'lb': 0, 'web1': 1, 'web2': 2}[node]}/"

    def up(self) -> None:
        """Start what is not running (all of it the first time), as a person would."""
        done = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "up"], env=self.env, timeout=600,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def kill(self, node: str) -> None:
        os.kill(int((self.folder / "run" / f"{node}.pid").read_text()), signal.SIGKILL)

    def log(self, node: str) -> str:
        return (self.folder / "logs" / f"{node}.log").read_text()


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    missing = [c for c in ("haproxy", "redis-server", "curl") if shutil.which(c) is None]
    if missing and os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip(f"the cluster needs {', '.join(missing)} (scripts/cluster.sh installs them as root)")
    # not under pytest's own temporary folder (0700): PostgreSQL's user must reach its data inside
    folder = Path(tempfile.mkdtemp(prefix="memchat-cluster-"))
    os.chmod(folder, 0o755)
    env = dict(os.environ, MEMCHAT_CLUSTER_DIR=str(folder), MEMCHAT_CLUSTER_PORT=str(free_port_base(CLUSTER_PORT_OFFSETS, start=21000)),
               MEMCHAT_CLUSTER_APP=f"{sys.executable} {ROOT / 'tests/cluster/node.py'}",
               MEMCHAT_CLUSTER_ARGS="--compressor generator --compress-every 2 --compress-idle-seconds 0 "
                                    "--max-new-tokens 120 --worker-poll-seconds 0.2",
               MEMCHAT_MESSAGES_PER_USER="6/minute", MEMCHAT_LOGIN_FAILURES_PER_NAME="3/hour",
               MEMCHAT_SIGNUPS_PER_ADDRESS="100/hour",
               MEMCHAT_TEST_LEASE_S=str(LEASE_S), MEMCHAT_TEST_STEP_S="0.02", MEMCHAT_TEST_COMPRESSION_S="2")
    running = Cluster(folder, int(env["MEMCHAT_CLUSTER_PORT"]), env)
    try:
        running.up()
        yield running
    finally:
        subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "down"], env=env, timeout=120, capture_output=True)
        if not os.environ.get("MEMCHAT_KEEP_CLUSTER"):  # set it to read the processes' logs after a failure
            shutil.rmtree(folder, ignore_errors=True)


class Person:
    """One browser (its cookies: the login and the load balancer's replica) and, once asked for, an API key."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.cookies: dict[str, str] = {}
        self.key: str | None = None

    def auth(self, action: str, node: str = "lb", password: str = PASSWORD) -> httpx.Response:
        body = None if action == "logout" else {"username": self.name, "password": password}
        answer = httpx.post(self.cluster.url(node) + f"auth/{action}", json=body, cookies=self.cookies, timeout=30)
        assert action != "signup" or answer.status_code == 200, answer.text
        for header in answer.headers.get_list("set-cookie"):
            key, _, rest = header.partition("=")
            value = rest.split(";")[0].strip('"')
            if value and "max-age=0" not in header.lower():
                self.cookies[key] = value
            else:
                self.cookies.pop(key, None)
        return answer

    def page(self, node: str = "lb") -> Client:
        """The page, as its browser has it. Through the load balancer, the browser first loads the
        page, which sets the balancer's cookie: a page's requests (Gradio's queue and its event
        stream) must all reach the replica that holds its session."""
        if node == "lb" and "memchat_replica" not in self.cookies:
            self.cookies["memchat_replica"] = httpx.get(self.cluster.url(), timeout=30).cookies["memchat_replica"]
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return Client(self.cluster.url(node), verbose=False, headers={"Cookie": cookie})

    def new_key(self, node: str = "lb") -> str | None:
        """An API key made on the page, or None when the page is not logged in."""
        made = re.search(r"sk-mc-[\w-]+", str(self.page(node).submit("laptop", "UTC", api_name="/create_api_key")
                                                  .result(timeout=60)))
        return made[0] if made else None

    def api(self, node: str = "lb") -> openai.OpenAI:
        self.key = self.key or self.new_key()
        return openai.OpenAI(base_url=self.cluster.url(node) + "v1", api_key=self.key, max_retries=0, timeout=60)

    def say(self, text: str, node: str = "lb", tokens: int = 8) -> dict:
        return self.api(node).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}],
                                                      max_tokens=tokens).model_dump()

    def memory(self, node: str = "lb") -> dict:
        return httpx.get(self.cluster.url(node) + "v1/memory", headers={"Authorization": f"Bearer {self.key}"},
                         timeout=30).json()


def wait_for(condition, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_a_login_made_on_one_replica_holds_on_the_other_and_a_logout_there_ends_it(cluster):
    alice = Person(cluster, "alice")
    assert alice.auth("signup", "web1").status_code == 200
    assert alice.new_key("web2") is not None  # logged in on web1, recognised on web2
    logged_in = dict(alice.cookies)
    assert alice.auth("logout", "web2").status_code == 200
    alice.cookies = logged_in  # the same login, shown to web1 again
    assert alice.new_key("web1") is None  # the logout on web2 ended it on web1
    # through the load balancer: its cookie keeps a browser on one replica
    assert alice.auth("login").status_code == 200 and alice.cookies.get("memchat_replica") in ("web1", "web2")


def test_a_compression_runs_on_a_worker_and_the_other_replica_answers_with_it(cluster):
    bob = Person(cluster, "bob")
    bob.auth("signup")
    bob.say("My cat is called Tobrik.", "web1")
    bob.say("I live in Quenmoor.", "web1")  # the second message: a compression is queued
    status = wait_for(lambda: (s := bob.memory("web2"))["adapter_version"] == 1 and s)
    assert status["absorbed_messages"] == 4
    answered = bob.say("What is my cat called?", "web2")
    assert answered["memchat"]["adapter_version"] == 1  # web2 answers with what a worker made
    streamed = list(bob.api().chat.completions.create(  # a streamed reply (SSE) through the load balancer
        model=MODEL_ID, messages=[{"role": "user", "content": "And where do I live?"}], max_tokens=8, stream=True))
    assert streamed[-1].model_dump()["memchat"]["adapter_version"] >= 1 and any(
        c.choices and c.choices[0].finish_reason == "length" for c in streamed)
    workers = cluster.log("worker1") + cluster.log("worker2")
    assert re.search(r"user \d+: adapter v1", workers)
    assert "adapter v1" not in cluster.log("web1") + cluster.log("web2")  # the replicas compress nothing


def test_the_login_throttle_and_the_message_limit_count_across_replicas(cluster):
    carol = Person(cluster, "carol")
    carol.auth("signup")
    wrong = [carol.auth("login", node, password="not the password").status_code for node in ("web1", "web2", "web1")]
    assert wrong == [401, 401, 401]
    assert carol.auth("login", "web2").status_code == 429  # 3 wrong passwords an hour, counted together
    dave = Person(cluster, "dave")
    dave.auth("signup")
    for i in range(6):
        dave.say(f"message {i}", "web1" if i % 2 else "web2")  # 6 a minute, on either replica
    with pytest.raises(openai.RateLimitError):
        dave.say("one too many", "web1")


def test_a_download_link_made_on_one_replica_is_served_by_the_other_only_to_its_owner(cluster):
    erin = Person(cluster, "erin")
    erin.auth("signup", "web1")
    erin.say("My dog is Rex.", "web1")
    outputs = erin.page("web1").submit(api_name="/export").result(timeout=60)
    link = re.search(r"downloads/[\w-]+", str(outputs))[0]
    served = httpx.get(cluster.url("web2") + link, timeout=30)
    assert served.status_code == 200 and served.content[:2] == b"PK"
    elsewhere = httpx.get(cluster.url("web2") + link, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=30)
    assert elsewhere.status_code == 404  # only to the address that asked for it
    erin.auth("logout", "web2")
    assert httpx.get(cluster.url("web1") + link, timeout=30).status_code == 404  # gone with the login


def test_kill_9_of_a_replica_mid_reply_loses_no_message_and_locks_its_user_out_for_a_lease_at_most(cluster):
    frank = Person(cluster, "frank")
    frank.auth("signup")
    stream = frank.api("web1").chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a long story about my cat Tobrik."}],
        max_tokens=120, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)  # the reply is being decoded on web1
    killed = time.monotonic()
    cluster.kill("web1")
    with pytest.raises(Exception):  # noqa: B017 - the connection just breaks
        for _ in chunks:
            pass
    frank.say("Are you still there?", "web2")  # waits for web1's lease on frank's turn to run out
    # from below too: web1 renewed its lease every third of it, so at least two thirds of a lease
    # were left when it died (a third here, for a renewal that ran late); an 8-token reply with no
    # wait takes well under a second
    assert LEASE_S / 3 <= time.monotonic() - killed < LEASE_S + 5
    listed = httpx.get(cluster.url("web2") + "v1/memory/messages", headers={"Authorization": f"Bearer {frank.key}"},
                       timeout=30).json()["data"]
    said = [m["content"] for m in listed if m["role"] == "user"]
    assert said == ["Tell me a long story about my cat Tobrik.", "Are you still there?"]  # nothing lost
    # the load balancer sends everyone to web2 meanwhile, and the restarted web1 serves again
    assert frank.say("Still here?")["choices"][0]["message"]["content"] is not None
    cluster.up()
    assert frank.say("And you, web1?", "web1")["memchat"] is not None


def test_kill_9_of_a_worker_mid_compression_hands_the_job_to_the_other(cluster):
    grace = Person(cluster, "grace")
    grace.auth("signup")
    cluster.kill("worker2")  # one worker only: it is the one that takes the job
    grace.say("My cat is called Tobrik.")
    grace.say("I live in Quenmoor.")
    wait_for(lambda: (grace.memory().get("compression") or {}).get("status") == "running")
    cluster.kill("worker1")  # mid-compression (each takes 2 s here)
    cluster.up()  # both workers again: one takes the job over once its lease has run out
    try:
        status = wait_for(lambda: (s := grace.memory())["adapter_version"] == 1 and s, 120)
    except AssertionError:
        raise AssertionError(f"the job did not finish: {grace.memory()}\n{cluster.log('worker1')[-3000:]}\n"
                             f"{cluster.log('worker2')[-3000:]}") from None
    assert status["compression"] is None and status["absorbed_messages"] == 4


def _pg_ctl(cluster: Cluster, *args: str) -> None:
    """pg_ctl on the cluster's PostgreSQL, as its own user (it refuses to run as root)."""
    binary = sorted(Path("/usr/lib/postgresql").iterdir(), key=lambda p: [int(x) for x in p.name.split(".")])[-1]
    command = [str(binary / "bin/pg_ctl"), "-D", str(cluster.folder / "postgres"), *args]
    subprocess.run((["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + command, check=True,
                   capture_output=True, timeout=60)


def test_a_replica_that_cannot_reach_the_database_or_redis_says_so_with_a_503_and_recovers(cluster):
    heidi = Person(cluster, "heidi")
    heidi.auth("signup", "web1")
    heidi.say("Hello there.", "web1")
    _pg_ctl(cluster, "-m", "fast", "stop")
    try:
        health = httpx.get(cluster.url("web1") + "healthz", timeout=30)
        assert health.status_code == 503 and health.json()["ready"] is False
        with pytest.raises(openai.InternalServerError) as refused:
            heidi.say("Are you there?", "web1")
        assert refused.value.status_code == 503 and "database" in refused.value.message
        login = heidi.auth("login", "web2")
        assert login.status_code == 503 and "database" in login.json()["error"]
        # through the load balancer: the replicas' own 503 at first; once HAProxy's checks (3, 2 s apart)
        # mark both down, its own 503 in the same JSON shape, never a bare error page
        deadline, seen = time.monotonic() + 30, set()
        while time.monotonic() < deadline and "No memchat replica" not in str(seen):
            answer = httpx.get(cluster.url() + "v1/models", headers={"Authorization": f"Bearer {heidi.key}"}, timeout=30)
            assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
            seen.add(answer.json()["error"]["message"])
            time.sleep(0.5)
        assert all("database" in m or "No memchat replica" in m for m in seen) and "No memchat replica" in str(seen)
    finally:
        _pg_ctl(cluster, "-w", "start", "-l", str(cluster.folder / "postgres.log"), "-o",
                f"-p {cluster.port + 20} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''")
    assert heidi.say("Back again?", "web1")["memchat"] is not None  # no restart of the replica needed
    os.kill(int((cluster.folder / "run/redis.pid").read_text()), signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(openai.InternalServerError) as refused:
        heidi.say("And the limits?", "web2")
    assert refused.value.status_code == 503 and "shared store" in refused.value.message
    cluster.up()  # Redis again
    assert heidi.say("All fine?", "web2")["memchat"] is not None
