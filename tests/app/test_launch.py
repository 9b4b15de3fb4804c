"""Starting the app: the port answers with a loading page at once, then becomes the app."""

import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client

from app.launch import start, start_worker
from app.loading import APP_STEPS, HEADING
from app.openai_api import MODEL_ID
from tests.app.helpers import SlowStart, chat, free_port, wait_for
from tests.conftest import tiny_text_engine
from tests.storage.helpers import FAST

ROOT = Path(__file__).resolve().parents[2]


def test_the_page_says_it_is_loading_until_the_model_is_ready(app_settings, live_text_engine, monkeypatch):
    app_settings.port = free_port()
    url = f"http://127.0.0.1:{app_settings.port}/"
    slow = SlowStart(app_settings, live_text_engine, monkeypatch)
    try:
        model_step = "language model and memory generator"
        wait_for(lambda: (_get(url + "healthz") or {}).get("current") == model_step)  # the database is done
        loading = httpx.get(url, headers={"accept": "text/html"})
        assert loading.status_code == 200 and HEADING in loading.text
        health = httpx.get(url + "healthz").json()
        assert health["ready"] is False and health["steps"] == list(APP_STEPS) and health["step"] == 2
        assert httpx.post(url + "gradio_api/queue/join", json={}).status_code == 503
    finally:
        running = slow.release()
    try:
        assert httpx.get(url + "healthz").json() == {"ready": True}
        page = httpx.get(url)
        assert page.status_code == 200 and HEADING not in page.text and "gradio" in page.text.lower()
        assert (app_settings.data_dir / "startup.json").exists()  # the next start shows a real progress bar
    finally:
        running.close()


def _get(url: str) -> dict | None:
    """The JSON at the address, or None while nothing listens there yet."""
    try:
        return httpx.get(url, timeout=1).json()
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_app_answers_from_the_main_thread_and_stops_cleanly_on_ctrl_c_or_sigterm(tmp_path, stop):
    """`app.py` runs the inference loop on the process's main thread (blocking start): a chat is
    answered there, and Ctrl+C (SIGINT) or SIGTERM (containers, systemd) stops everything cleanly:
    a reply streaming at that moment ends with the API's 503-shaped error, and the process exits 0."""
    port = free_port()
    script = (
        "import logging, pathlib, sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "import adapter_core.serving.decoding, adapter_core.serving.scheduler\n"
        "from app.launch import start\n"
        "from app.settings import AppSettings\n"
        "from tests.conftest import byte_tokenizer, tiny_text_engine\n"
        "from tests.storage.helpers import FAST\n"
        # replies that never end by themselves, a step every 50 ms: one is still streaming at the signal
        "adapter_core.serving.decoding.end_of_turn_ids = lambda tokenizer: []\n"
        "step = adapter_core.serving.scheduler.InferenceLoop._step\n"
        "adapter_core.serving.scheduler.InferenceLoop._step = lambda self: (time.sleep(0.05), step(self))\n"
        f"start(AppSettings(data_dir=pathlib.Path(sys.argv[2]), port={port}, max_new_tokens=300), "
        "tiny_text_engine(byte_tokenizer()), FAST)\n"
    )
    log_file = tmp_path / "app.log"
    with log_file.open("w") as log:
        # a shell without job control starts background processes with SIGINT ignored: not here
        process = subprocess.Popen([sys.executable, "-c", script, str(ROOT), str(tmp_path / "data")], stdout=log,
                                   stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(lambda: (_get(url + "healthz") or {}).get("ready"), 60)
            made = httpx.post(url + "auth/signup", json={"username": "tester", "password": "a good password 42"})
            client = Client(url, verbose=False, headers={"Cookie": made.headers["set-cookie"].split(";")[0]})
            key = re.search(r"sk-mc-[\w-]+", str(client.submit("laptop", "UTC", api_name="/create_api_key")
                                                  .result(timeout=60)))[0]
            api = openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0, timeout=60)
            stream = api.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=300, stream=True)
            chunks = iter(stream)
            next(chunks), next(chunks)  # the role, then the reply's first text: it is being decoded
            process.send_signal(stop)
            with pytest.raises(openai.APIError) as ended:
                for _ in chunks:
                    pass
            assert ended.value.body["code"] == "unavailable" and "stopping" in ended.value.message
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    text = log_file.read_text()
    assert "stopping" in text and "Traceback" not in text, text


def test_app_py_answers_with_the_loading_page_before_it_imports_the_model_code(tmp_path):
    """`python app.py` listens with the loading page first, then imports torch, transformers and
    the model code (seconds on 2 cores): the port answers during them, its clock from the
    process's start."""
    port = free_port()
    script = (
        "import runpy, sys, httpx\n"
        "class Probe:\n"  # looks at the port when the model code is first imported
        "    seen = []\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'adapter_core' and not self.seen:\n"
        f"            page = httpx.get('http://127.0.0.1:{port}/', headers={{'accept': 'text/html'}})\n"
        f"            health = httpx.get('http://127.0.0.1:{port}/healthz').json()\n"
        "            self.seen.append(1)\n"
        "            print('PROBE', page.status_code, 'memchat is starting' in page.text, 'torch' in sys.modules,\n"
        "                  health['current'], health['elapsed'] > 0, flush=True)\n"
        "sys.meta_path.insert(0, Probe())\n"
        "sys.argv = ['app.py'] + sys.argv[1:]\n"
        "runpy.run_path('app.py', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, "--port", str(port), "--data-dir", str(tmp_path),
                           "--model", str(tmp_path / "no-such-model")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "PROBE 200 True False Python libraries True" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 2 and "memchat cannot start" in done.stderr  # then it went on, to the bad model


def test_a_web_replica_leaves_compressions_to_a_worker_on_another_machine(app_settings, tiny_tokenizer, password,
                                                                         tmp_path):
    """--role web serves and queues; --role worker compresses what any replica queued; with the
    snapshots in the database, the two share nothing but the database (each its own data folder)."""
    app_settings.port, app_settings.worker_poll_seconds = free_port(), 0.05
    app_settings.database_url, app_settings.snapshot_store = f"sqlite:///{tmp_path / 'shared.db'}", "database"
    web = start(replace(app_settings, role="web", data_dir=tmp_path / "web"), tiny_text_engine(tiny_tokenizer, live=True),
                FAST, block=False)
    try:
        uid = web.services.accounts.sign_up("alice", password).account.id
        chat(web.services, uid, "My cat is called Tobrik.")
        chat(web.services, uid, "I live in Quenmoor.")
        assert web.worker is None
        time.sleep(0.5)
        assert web.services.memory.status(uid).job.status == "queued"  # nobody here compresses
        worker = start_worker(replace(app_settings, role="worker", data_dir=tmp_path / "worker"),
                              tiny_text_engine(tiny_tokenizer, live=True), FAST, block=False)
        try:
            wait_for(lambda: web.services.memory.status(uid).adapter_version == 1)
        finally:
            worker.close()
        _, finished = chat(web.services, uid, "What is my cat called?")
        assert finished.stats.adapter_version == 1  # the replica answers with what the worker made
        assert not (tmp_path / "worker" / "adapters").exists() and not (tmp_path / "web" / "adapters").exists()
    finally:
        web.close()
