"""Screenshots of the real app (default model) for the README: docs/screenshots/{chat,memory,admin}.png.

    .venv/bin/python scripts/screenshots.py      # needs Debian's chromium; about two minutes on a CPU
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter_core.engine import load_engine  # noqa: E402
from app.launch import start  # noqa: E402
from app.settings import AppSettings  # noqa: E402

PASSWORD = "screenshot password"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def say(page, text: str) -> None:
    """Send a message and return once its reply is complete (its stats line has appeared)."""
    stats = page.locator("#reply-stats")
    before = stats.inner_text()
    field(page, "message").fill(text)
    page.locator("#send").click()
    for _ in range(360):
        page.wait_for_timeout(500)
        now = stats.inner_text()
        if now != before and "prompt tokens" in now:
            return
    raise TimeoutError(f"no reply to {text!r}")


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    out = ROOT / "docs" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = AppSettings(data_dir=Path(tempfile.mkdtemp()), port=port, admin_username="admin",
                           admin_password=PASSWORD, compress_every=2, max_new_tokens=48, worker_poll_seconds=0.2)
    engine = load_engine(cache_dir=ROOT / ".cache" / "model-cache")
    running = start(settings, engine, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(running.url)
            field(page, "username").fill("ilvara")
            field(page, "password").fill(PASSWORD)
            page.locator("#signup").click()
            page.locator("#whoami").get_by_text("Logged in as ilvara").wait_for(timeout=30_000)
            say(page, "Hi! My name is Ilvara and I live in a small town called Quenmoor.")
            say(page, "My cat Tobrik sleeps all day while I work as a glassblower.")
            user_id = running.services.storage.find_user("ilvara").id
            while running.services.storage.latest_snapshot(user_id) is None:  # the worker compresses
                page.wait_for_timeout(500)
            say(page, "What is the name of my cat?")
            page.screenshot(path=str(out / "chat.png"), full_page=True)

            page.get_by_role("tab", name="Memory").click()
            field(page, "key-name").fill("my chat client")
            page.locator("#create-key").click()
            page.locator("#new-key textarea, #new-key input").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "memory.png"), full_page=True)
            page.get_by_role("tab", name="Chat").click()

            page.get_by_role("button", name="Log out").click()
            field(page, "username").fill("admin")
            field(page, "password").fill(PASSWORD)
            page.locator("#login").click()
            page.get_by_role("tab", name="Admin").click()
            page.locator("#admin-refresh").click()
            page.wait_for_timeout(1500)
            page.locator("#admin-user input").click()
            page.screenshot(path=str(out / "debug.png"), full_page=True)
            page.get_by_role("option", name=re.compile("ilvara")).click()
            page.wait_for_timeout(4000)
            field(page, "probe-question").fill("What is the name of my cat?")
            page.locator("#probe").click()
            page.get_by_text("full history (").wait_for(timeout=180_000)
            page.screenshot(path=str(out / "admin.png"), full_page=True)
            browser.close()
    finally:
        running.close()
    print(f"wrote {out / 'chat.png'}, {out / 'memory.png'} and {out / 'admin.png'}")


if __name__ == "__main__":
    main()
