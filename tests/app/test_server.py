"""The web server over HTTP on loopback: what it refuses before Gradio sees it, and downloads."""

import io
import re
import socket
import stat
import zipfile

import httpx
import pytest

from app.launch import start
from tests.app.helpers import Visitor, free_port, wait_for
from tests.storage.helpers import FAST, table_counts


def link(html: str) -> str:
    return re.search(r'href="([^"]+)"', html).group(1)


def test_health_and_no_run_history_in_the_browser(running):
    assert httpx.get(running.url + "healthz").json() == {"ready": True}
    config = httpx.get(running.url + "config").json()
    assert config["run_history"] is False  # Gradio would keep every call's inputs in localStorage


def test_uploads_and_oversized_bodies_are_refused_unread(running):
    upload = httpx.post(running.url + "gradio_api/upload", files={"files": ("a.txt", b"x" * 10)})
    assert upload.status_code == 403 and "no file uploads" in upload.json()["error"]["message"]
    for route in ("gradio_api/process_recording", "gradio_api/component_server", "anything/else"):
        sneaked = httpx.post(running.url + route, files={"files": ("a.wav", b"x" * 10)})
        assert sneaked.status_code == 403, route  # every multipart body, whatever the path
    huge = httpx.post(running.url + "gradio_api/queue/join", content=b"{" + b" " * 400_000 + b"}",
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413


def test_an_export_is_served_to_its_owner_briefly_and_dies_with_the_account(running, password):
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    alice.call("chat", "My cat is called Tobrik.")
    url = running.url + link(alice.call("export")["export-link"])
    response = httpx.get(url)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    assert 'filename="memchat-alice.zip"' in response.headers["content-disposition"]
    history = zipfile.ZipFile(io.BytesIO(response.content)).read("history.json").decode()
    assert "Tobrik" in history
    assert list(running.services.downloads.folder.iterdir()) == []  # built, then kept in the database only
    assert stat.S_IMODE(running.services.downloads.folder.stat().st_mode) == 0o700

    admin = Visitor(running)
    admin.call("login", "root", password)
    alice_id = running.services.storage.find_user("alice").id
    admin.call("admin_ask_delete", alice_id)
    admin.call("admin_confirm")
    assert httpx.get(url).status_code == 404
    assert table_counts(running.services.storage)["download_links"] == 0


def test_logging_out_drops_the_session_s_download_links(running, password):
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    url = running.url + link(alice.call("export")["export-link"])
    page = alice.call("logout")
    assert page["export-link"] == "" and not page["chatbot"]
    assert httpx.get(url).status_code == 404


def test_the_data_folder_is_private(running):
    data_dir = running.services.storage.data_dir
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "memchat.db").stat().st_mode) == 0o600


def test_an_ipv6_client_gets_its_export(app_settings, live_text_engine, password):
    """The page and the download route count an IPv6 client alike (by its /64)."""
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    app_settings.host, app_settings.port = "::1", free_port()
    running = start(app_settings, live_text_engine, FAST, block=False)
    try:
        alice = Visitor(running)
        alice.call("signup", "alice", password)
        response = httpx.get(running.url + link(alice.call("export")["export-link"]))
        assert response.status_code == 200 and "history.json" in zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    finally:
        running.close()


def test_every_request_is_logged_in_one_line_without_its_secrets(running, password, caplog):
    from tests.app.test_openai_api import sign_up

    alice, key = sign_up(running, "alice", password)
    with caplog.at_level("INFO", logger="memchat.access"):
        assert httpx.get(running.url + "healthz?token=abc").status_code == 200
        assert httpx.get(running.url + "v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(running.url + "v1/models", headers={"Authorization": "Bearer wrong-key"}).status_code == 401
        assert httpx.get(running.url + "downloads/s3cr3t-t0ken").status_code == 404
        assert httpx.post(running.url + "gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code == 403
        # a line is written once its answer is sent: the last one may come a moment after the client has it
        wait_for(lambda: any("/gradio_api/upload" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if r.name == "memchat.access"]
    assert any(re.fullmatch(r"GET /healthz 200 \d+ ms user -", line) for line in lines), lines
    assert any(re.fullmatch(rf"GET /v1/models 200 \d+ ms user {alice}", line) for line in lines), lines
    assert any(re.fullmatch(r"GET /v1/models 401 \d+ ms user -", line) for line in lines), lines
    assert any(re.fullmatch(r"GET /downloads/… 404 \d+ ms user -", line) for line in lines), lines
    assert any(line.startswith("POST /gradio_api/upload 403") for line in lines), lines
    assert not [line for line in lines if key in line or "s3cr3t" in line or "abc" in line or "wrong-key" in line]
