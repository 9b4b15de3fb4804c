"""Starting the app: the port answers with a loading page at once, then becomes the app."""

import signal
import subprocess
import sys
from pathlib import Path

import httpx
from gradio_client import Client

from app.loading import HEADING
from tests.app.helpers import SlowStart, free_port, wait_for

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
        assert health["ready"] is False and health["steps"][0] == "database"
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


def test_the_app_answers_from_the_main_thread_and_stops_on_ctrl_c(tmp_path):
    """`app.py` runs the inference loop on the process's main thread (blocking start): a chat is
    answered there, and Ctrl+C (SIGINT) stops everything cleanly."""
    port = free_port()
    script = (
        "import logging, pathlib, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from app.launch import start\n"
        "from app.settings import AppSettings\n"
        "from tests.conftest import byte_tokenizer, tiny_text_engine\n"
        "from tests.storage.helpers import FAST\n"
        f"start(AppSettings(data_dir=pathlib.Path(sys.argv[2]), port={port}), tiny_text_engine(byte_tokenizer()), FAST)\n"
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
            client = Client(url, verbose=False)
            client.submit("tester", "a good password 42", api_name="/signup").result(timeout=60)
            page = client.submit("hello there", api_name="/chat").result(timeout=60)
            assert "prompt tokens" in str(page)  # answered by the loop on the process's main thread
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert "stopping" in log_file.read_text()
