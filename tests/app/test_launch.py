"""Starting the app: the port answers with a loading page at once, then becomes the app."""

import threading

import httpx

from app.launch import start
from app.loading import HEADING
from tests.app.helpers import free_port, wait_for
from tests.storage.helpers import FAST


def test_the_page_says_it_is_loading_until_the_model_is_ready(app_settings, live_text_engine, monkeypatch):
    app_settings.port = free_port()
    url = f"http://127.0.0.1:{app_settings.port}/"
    release = threading.Event()

    def slow_load(*args, **kwargs):
        release.wait(30)
        return live_text_engine

    monkeypatch.setattr("app.launch.load_engine", slow_load)
    started = {}
    thread = threading.Thread(target=lambda: started.setdefault("app", start(app_settings, None, FAST, block=False)))
    thread.start()
    try:
        model_step = "language model and memory generator"
        wait_for(lambda: (_get(url + "healthz") or {}).get("current") == model_step)  # the database is done
        loading = httpx.get(url, headers={"accept": "text/html"})
        assert loading.status_code == 200 and HEADING in loading.text
        health = httpx.get(url + "healthz").json()
        assert health["ready"] is False and health["steps"][0] == "database"
        assert httpx.post(url + "gradio_api/queue/join", json={}).status_code == 503
    finally:
        release.set()
        thread.join(60)
    try:
        assert httpx.get(url + "healthz").json() == {"ready": True}
        page = httpx.get(url)
        assert page.status_code == 200 and HEADING not in page.text and "gradio" in page.text.lower()
        assert (app_settings.data_dir / "startup.json").exists()  # the next start shows a real progress bar
    finally:
        started["app"].close()


def _get(url: str) -> dict | None:
    """The JSON at the address, or None while nothing listens there yet."""
    try:
        return httpx.get(url, timeout=1).json()
    except httpx.TransportError:
        return None
