"""End to end in a real headless Chromium (Debian's, driven by Playwright): sign up, chat, compress,
and watch the memory panel change."""

from __future__ import annotations

import os
import shutil

import pytest


CHROMIUM = os.environ.get("MEMCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing, but CI=true: .ci/run installs Debian's chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def app_settings(app_settings):
    app_settings.compress_every = 100  # only "Compress now" compresses here
    return app_settings


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_sign_up_chat_compress_and_see_memory_change(browser, running, password):
    page = browser.new_page()
    page.goto(running.url)
    field(page, "username").fill("carol")
    field(page, "password").fill(password)
    page.locator("#signup").click()
    page.locator("#whoami").get_by_text("Logged in as carol").wait_for(timeout=20_000)

    field(page, "message").fill("My bike is a green Valtor 340.")
    page.locator("#send").click()
    page.locator("#reply-stats").get_by_text("prompt tokens").wait_for(timeout=30_000)
    assert "green Valtor 340" in page.locator("#chatbot").inner_text()

    page.get_by_role("tab", name="Memory").click()
    page.locator("#refresh-memory").click()
    status = page.locator("#memory-status")
    status.get_by_text("Adapter: none yet").wait_for(timeout=20_000)
    assert "Waiting to be absorbed: 2 messages" in status.inner_text()

    page.locator("#compress-now").click()
    for _ in range(60):  # the panel refreshes itself every few seconds; click too, to be quick
        page.locator("#refresh-memory").click()
        page.wait_for_timeout(500)
        if "Adapter: v1" in status.inner_text():
            break
    text = status.inner_text()
    assert "Adapter: v1" in text and "In memory: 2 messages" in text and "Waiting to be absorbed: 0 messages" in text
