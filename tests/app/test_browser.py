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


def sign_up(page, url, name, password):
    page.goto(url)
    field(page, "username").fill(name)
    field(page, "password").fill(password)
    page.locator("#signup").click()
    page.locator("#whoami").get_by_text(f"Logged in as {name}").wait_for(timeout=20_000)


def send(page, text):
    field(page, "message").fill(text)
    page.locator("#send").click()
    page.locator("#reply-stats").get_by_text("prompt tokens").wait_for(timeout=30_000)


def test_nothing_secret_is_kept_in_the_browser(browser, running, password):
    page = browser.new_page()
    sign_up(page, running.url, "carol", password)
    send(page, "my private note")
    page.locator("#logout").click()
    page.locator("#login").wait_for()
    kept = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert password not in kept and "my private note" not in kept


def test_the_next_person_on_the_same_tab_sees_nothing_of_the_last(browser, running, password):
    page = browser.new_page()
    sign_up(page, running.url, "alice", password)
    send(page, "Alice's diary entry")
    page.get_by_role("tab", name="Memory").click()
    page.locator("#refresh-memory").click()
    page.locator("#export").click()
    page.locator("#export-link a").wait_for(timeout=20_000)
    page.locator("#logout").click()

    field(page, "username").fill("bob")
    field(page, "password").fill(password)
    page.locator("#signup").click()
    page.locator("#whoami").get_by_text("Logged in as bob").wait_for(timeout=20_000)
    page.get_by_role("tab", name="Memory").click()
    assert page.locator("#export-link a").count() == 0
    assert "diary" not in page.locator("body").inner_text()
    page.locator("#forget-choice input").click()
    assert "diary" not in page.locator("body").inner_text()


def test_html_in_a_message_is_shown_as_text(browser, running, password):
    page = browser.new_page()
    sign_up(page, running.url, "carol", password)
    send(page, '<form action="https://evil.example/"><input type="password" name="pw">'
               "<button>Sign in again</button></form>")
    chat = page.locator("#chatbot")
    assert chat.locator("form, input, textarea, select").count() == 0
    assert chat.get_by_role("button", name="Sign in again").count() == 0
    assert '<input type="password" name="pw">' in chat.inner_text()


def test_a_refusal_is_a_message_beside_the_form_which_stays_usable(browser, running, password):
    page = browser.new_page(locale="de-DE")  # Gradio translates its own labels
    page.goto(running.url)
    field(page, "username").fill("carol")
    field(page, "password").fill("wrong password")
    page.locator("#login").click()
    page.locator("#login-notice").get_by_text("Wrong username or password.").wait_for(timeout=20_000)
    assert page.get_by_text("Error", exact=True).count() == 0
    assert field(page, "username").input_value() == "carol"  # what was typed stays, to be corrected
    field(page, "password").fill(password)
    page.locator("#signup").click()
    page.locator("#whoami").get_by_text("Logged in as carol").wait_for(timeout=20_000)
    send(page, "hello")
    running.services.settings.max_message_chars = 20
    field(page, "message").fill("a message that is far too long")
    page.locator("#send").click()
    page.locator("#chat-notice").get_by_text("too long").wait_for(timeout=20_000)
    assert field(page, "message").input_value() == "a message that is far too long"
    assert page.get_by_text("Error", exact=True).count() == 0
    # the chat's own trash icon would only empty the view: it is not offered, in any language
    assert page.locator("#chatbot .top-panel > button:visible").count() == 1  # "copy all" alone
    assert page.locator('#chatbot button[aria-label="Chat leeren"]:visible').count() == 0


def test_a_deleted_accounts_open_tab_never_becomes_the_next_account(browser, running, password):
    """Attacker findings, point 1: the old tab kept a user id, and the next sign-up got that id."""
    old_tab = browser.new_page()
    sign_up(old_tab, running.url, "alice", password)
    send(old_tab, "Alice's secret")
    alice = running.services.storage.find_user("alice")
    running.services.accounts.delete_own(alice.id)  # as DELETE /v1/account does, from elsewhere

    new_tab = browser.new_context().new_page()
    sign_up(new_tab, running.url, "bob", password)
    send(new_tab, "Bob's own secret")
    assert running.services.storage.find_user("bob").id != alice.id

    field(old_tab, "message").fill("written into whose chat?")
    old_tab.locator("#send").click()
    old_tab.locator("#chat-notice").get_by_text("Please log in").wait_for(timeout=20_000)
    old_tab.get_by_role("tab", name="Memory").click()
    old_tab.locator("#refresh-memory").click()
    old_tab.locator("#memory-notice").get_by_text("Please log in").wait_for(timeout=20_000)
    assert "Bob's own secret" not in old_tab.locator("body").inner_text()
    bob = running.services.storage.find_user("bob")
    assert [m.text for m in running.services.storage.history(bob.id) if m.role == "user"] == ["Bob's own secret"]


def test_send_during_a_reply_says_why_the_message_waits(browser, running, password, monkeypatch):
    """Attacker findings, point 6: a second Send while the reply streamed did nothing, silently."""
    import threading

    from tests.app.helpers import FakeStream

    gate = threading.Event()
    monkeypatch.setattr(running.loop, "submit", lambda request: FakeStream(request, ["Thinking ", "slowly."], gate=gate))
    page = browser.new_page()
    sign_up(page, running.url, "dora", password)
    field(page, "message").fill("first question")
    page.locator("#send").click()
    page.locator("#chatbot").get_by_text("Thinking").wait_for(timeout=20_000)  # the reply is streaming
    field(page, "message").fill("second question")
    page.locator("#send").click()
    try:
        page.locator("#chat-notice").get_by_text("still being answered").wait_for(timeout=20_000)
        assert field(page, "message").input_value() == "second question"  # kept, to be sent when it is done
    finally:
        gate.set()
    page.locator("#reply-stats").get_by_text("prompt tokens").wait_for(timeout=30_000)


def test_the_login_is_an_httponly_strict_cookie_never_in_a_url_and_a_reload_keeps_it(browser, running, password):
    """Attacker findings, point 3: the page's login was Gradio's session hash (Math.random(), sent
    in URLs); now it is a server-made secret in an HttpOnly, SameSite=Strict session cookie."""
    context = browser.new_context()
    page = context.new_page()
    urls = []
    page.on("request", lambda request: urls.append(request.url))
    sign_up(page, running.url, "carol", password)
    (cookie,) = [c for c in context.cookies() if c["name"] == "memchat_login"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] == -1  # gone with the browser
    assert len(cookie["value"]) >= 32 and page.evaluate("document.cookie").find(cookie["value"]) == -1
    send(page, "a note")
    assert urls and not any(cookie["value"] in url for url in urls)
    assert cookie["value"] not in page.content()

    page.reload()  # the same browser: still logged in
    page.locator("#whoami").get_by_text("Logged in as carol").wait_for(timeout=20_000)
    page.locator("#logout").click()
    page.locator("#login").wait_for()
    page.wait_for_timeout(500)
    assert not [c for c in context.cookies() if c["name"] == "memchat_login"]  # cleared by the server
    page.reload()
    page.locator("#login").wait_for(timeout=20_000)
    assert not page.locator("#whoami").is_visible()
    context.close()
