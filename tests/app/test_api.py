"""The app over HTTP with gradio_client, launched on loopback with a tiny model.

Refusals come back as a notice beside the form (the page's own way of showing them), never as an
exception with internal text; tests read outputs by the components' elem_id."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import zipfile

import httpx

from tests.app.helpers import FakeStream, Visitor, wait_for

ADMIN_ENDPOINTS = {
    "admin_users": (), "admin_user": (1,), "admin_probe": (1, "hi"), "admin_rebuild": (1,),
    "admin_ask_reset": (1,), "admin_ask_delete": (1,), "admin_confirm": (), "admin_export_peft": (1,),
    "admin_signup": (False,), "admin_revoke_key": (1, 1),
}


def texts(chatbot: list[dict]) -> list[str]:
    return [part["text"] for m in chatbot for part in m["content"] if part.get("type") == "text"]


def notice(outputs: dict) -> str:
    return next(v for k, v in outputs.items() if k.endswith("notice") and v)


def download(running, outputs: dict, key: str) -> zipfile.ZipFile:
    url = running.url + re.search(r'href="([^"]+)"', outputs[key]).group(1)
    return zipfile.ZipFile(io.BytesIO(httpx.get(url).content))


def test_sign_up_chat_compress_and_export_over_http(running, password):
    alice = Visitor(running)
    assert alice.call("signup", "alice", password)["whoami"] == "Logged in as **alice**"
    page = alice.call("chat", "My cat is called Tobrik.")
    assert texts(page["chatbot"])[0] == "My cat is called Tobrik." and page["message"] == ""
    assert "prompt tokens" in page["reply-stats"] and "no adapter yet" in page["reply-stats"]
    alice.call("chat", "And I live in Quenmoor.")  # the second message triggers compression
    wait_for(lambda: "v1" in alice.call("memory")["memory-status"])
    assert "**In memory**: 4 messages" in alice.call("memory")["memory-status"]
    assert "adapter v1" in alice.call("chat", "What is my cat called?")["reply-stats"]
    with download(running, alice.call("export"), "export-link") as z:
        history = json.loads(z.read("history.json"))
        assert "adapter/peft/adapter_config.json" in z.namelist()
    assert [m["text"] for m in history["messages"]][0] == "My cat is called Tobrik."


def test_login_is_required_for_everything(running):
    anonymous = Visitor(running)
    for endpoint, args in {"chat": ("hi",), "memory": (), "compress_now": (), "ask_forget": (1,), "forget": (),
                           "api_keys": (), "create_api_key": ("laptop",), "ask_revoke_api_key": (1,),
                           "ask_forget_everything": (), "ask_delete_account": (), "confirm_mine": (),
                           "export": (), **ADMIN_ENDPOINTS}.items():
        outputs = anonymous.call(endpoint, *args)
        if endpoint != "admin_confirm":
            assert notice(outputs) == "Please log in.", endpoint
    assert anonymous.call("login", "root", "not the password")["login-notice"] == "Wrong username or password."


def test_a_non_admin_gets_no_admin_data_through_any_endpoint(running, password):
    mallory = Visitor(running)
    mallory.call("signup", "mallory", password)
    for endpoint, args in ADMIN_ENDPOINTS.items():
        if endpoint != "admin_confirm":  # nothing is waiting for mallory's confirmation
            assert notice(mallory.call(endpoint, *args)) == "Admins only.", endpoint
    admin = Visitor(running)
    admin.call("login", "root", password)
    users = admin.call("admin_users")
    assert {row[1] for row in users["admin-users"]["data"]} == {"root", "mallory"}  # nothing was changed
    assert users["admin-notice"] == ""


def test_user_b_cannot_reach_user_a(running, password):
    alice, bob = Visitor(running), Visitor(running)
    alice.call("signup", "alice", password)
    bob.call("signup", "bob", password)
    alice.call("chat", "My secret code is ZEBRA-4821.")
    alice.call("chat", "Remember it.")
    wait_for(lambda: "v1" in alice.call("memory")["memory-status"])
    alice_ids = [choice[1] for choice in alice.call("memory")["forget-choice"]["choices"]]

    page = bob.call("memory")
    assert page["forget-choice"]["choices"] == [] and "**Adapter**: none yet" in page["memory-status"]
    assert "ZEBRA" not in json.dumps(bob.call("chat", "hello")["chatbot"])
    for message_id in alice_ids:  # guessing ids
        assert "first" in notice(bob.call("ask_forget", message_id))
    with download(running, bob.call("export"), "export-link") as z:
        assert "ZEBRA" not in z.read("history.json").decode()
        assert not any(name.startswith("adapter/") for name in z.namelist())
    assert len(alice.call("memory")["forget-choice"]["choices"]) == 2  # alice's messages are untouched


def test_forgetting_asks_first_and_takes_the_reply_too(running, password):
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    alice.call("chat", "My secret code is ZEBRA-4821.")
    alice.call("chat", "I like tea.")
    first = alice.call("memory")["forget-choice"]["choices"][0][1]
    asked = alice.call("ask_forget", first)
    assert "ZEBRA-4821" in asked["forget-question"] and "cannot be undone" in asked["forget-question"]
    assert len(running.services.chat.history(running.services.storage.find_user("alice").id)) == 4  # nothing yet
    page = alice.call("forget")
    assert texts(page["chatbot"])[0] == "I like tea." and "ZEBRA" not in json.dumps(page["chatbot"])
    assert notice(alice.call("forget")) == "Nothing is waiting for confirmation."  # asked once only


def test_a_refused_message_stays_in_the_box(running, password):
    running.services.settings.messages_per_user = "1/minute"
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    alice.call("chat", "first")
    page = alice.call("chat", "second, too soon")
    assert "faster than the model can answer" in page["chat-notice"]
    assert page["message"] == "second, too soon" and "second" not in json.dumps(page["chatbot"])


def test_a_reply_cut_short_by_a_logout_does_not_hold_up_the_next_turn(running, password, monkeypatch):
    """Logging out cancels the reply; its turn's lock is let go, so the user's next message goes
    through at once (not after the wait for a previous reply)."""
    gate, started = threading.Event(), threading.Event()

    def slow(request):
        started.set()
        return FakeStream(request, ["Thinking ", "slowly."], gate=gate)

    monkeypatch.setattr(running.loop, "submit", slow)
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    alice.client.submit("stuck", api_name="/chat")
    assert started.wait(20)
    alice.call("logout")
    gate.set()
    monkeypatch.undo()
    alice.call("login", "alice", password)
    began = time.monotonic()
    page = alice.call("chat", "hello again")
    assert "prompt tokens" in page["reply-stats"] and time.monotonic() - began < 20
    stored = running.services.chat.history(running.services.storage.find_user("alice").id)
    assert stored[0].text == "stuck" and [(m.role, m.text) for m in stored[-2:]] == [
        ("user", "hello again"), ("assistant", stored[-1].text)]


def test_a_user_forgets_everything_or_deletes_the_account_from_the_page_after_a_question(running, password):
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    alice.call("chat", "My cat is called Tobrik.")
    assert alice.call("export")["export-link"]
    uid = running.services.storage.find_user("alice").id
    page = alice.call("ask_forget_everything")
    assert "Forget everything?" in page["mine-question"] and running.services.chat.history(uid)  # asked first
    page = alice.call("confirm_mine", "UTC")
    assert page["chatbot"] == [] and page["export-link"] == "" and page["mine-question"] == ""
    assert running.services.storage.history(uid) == [] and running.services.storage.find_user("alice")
    assert notice(alice.call("confirm_mine", "UTC")) == "Nothing is waiting for confirmation."  # asked once only

    page = alice.call("ask_delete_account")
    assert "Delete your account?" in page["mine-question"] and running.services.storage.find_user("alice")
    page = alice.call("confirm_mine", "UTC")
    assert page["whoami"] == "" and page["chatbot"] == [] and running.services.storage.find_user("alice") is None
    assert notice(alice.call("memory")) == "Please log in."  # the tab is back at the login view


def test_an_admin_is_told_before_the_question_that_their_own_account_is_not_deleted_here(running, password):
    admin = Visitor(running)
    admin.call("login", "root", password)
    root_id = running.services.storage.find_user("root").id
    page = admin.call("admin_ask_delete", root_id)
    assert "cannot delete their own account here" in page["admin-notice"] and not page.get("admin-question")


def test_another_browser_with_the_pages_session_hash_but_not_its_cookie_acts_as_nobody(running, password):
    """Attacker findings, point 3: Gradio's session hash travels in URLs; whoever learnt it could
    act as the page that logged in with it. The login is the cookie now, which the hash is not."""
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    alice.call("chat", "My secret is 4417.")
    mallory = Visitor(running)
    mallory.client.session_hash = alice.client.session_hash  # what a URL or a log gave away
    page = mallory.call("memory")
    assert notice(page) == "Please log in." and "memory-status" not in page
    assert notice(mallory.call("create_api_key", "mine", "UTC")) == "Please log in."
    assert running.services.api_keys.mine(running.services.storage.find_user("alice").id) == ()


def test_a_question_waiting_on_a_page_is_done_only_for_the_account_that_asked_it(running, password):
    """The page's state is named by its session hash: someone who sends events under it (their own
    login, Alice's hash) can leave a question waiting there; Alice's "Yes" must not do it."""
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    alice.call("chat", "Keep this.")
    mallory = Visitor(running)
    mallory.call("signup", "mallory", password)
    mallory.client = mallory._client()
    mallory.client.session_hash = alice.client.session_hash
    mallory.call("ask_delete_account")  # waits on Alice's page now, asked by Mallory
    assert notice(alice.call("confirm_mine", "UTC")) == "That question was asked by another login: ask again."
    assert running.services.storage.find_user("alice") is not None and running.services.storage.find_user("mallory")
    alice.call("ask_forget_everything")
    mallory.call("confirm_mine", "UTC")  # Mallory's "Yes" to Alice's question: refused too
    assert len(running.services.chat.history(running.services.storage.find_user("alice").id)) == 2


def test_an_event_sent_by_another_origins_page_acts_as_nobody(running, password):
    """SameSite keeps other sites' requests without the cookie, not another port's or subdomain's
    (Gradio's CORS would let such a page read the answers): their Origin says who sent them."""
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies.items())
    from gradio_client import Client
    for headers in ({"Origin": "http://127.0.0.1:1"}, {"Sec-Fetch-Site": "same-site"}):
        other = Client(running.url, verbose=False, headers={"Cookie": cookie, **headers})
        outputs = other.predict("UTC", api_name="/memory")
        assert outputs[-1] == "Please log in.", headers
    assert "memory-status" in alice.call("memory")  # her own page still works


def test_the_login_cookie_ends_at_logout_and_with_the_account(running, password):
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    stolen = dict(alice.cookies)  # a copy of the cookie, as malware or a shared machine would keep it
    alice.call("logout")
    assert not alice.cookies  # the server cleared it
    thief = Visitor(running)
    thief.cookies = stolen
    thief.client = thief._client()
    assert notice(thief.call("memory")) == "Please log in."  # ended on the server, not only in the browser

    alice.call("login", "alice", password)
    kept = dict(alice.cookies)
    assert kept != stolen  # a new secret for a new login
    alice.call("ask_delete_account")
    assert alice.call("confirm_mine")["login-notice"] == ""  # the login view
    thief.cookies = kept
    thief.client = thief._client()
    assert notice(thief.call("memory")) == "Please log in."


def test_auth_takes_json_from_this_site_only_and_says_why_it_refuses(running, password):
    url = running.url.rstrip("/")
    body = {"username": "alice", "password": password}
    assert httpx.post(f"{url}/auth/signup", data=body).status_code == 400  # a plain HTML form: no
    refused = httpx.post(f"{url}/auth/signup", json=body, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and "memchat_login" not in refused.headers.get("set-cookie", "")
    made = httpx.post(f"{url}/auth/signup", json=body, headers={"Origin": url})
    assert made.status_code == 200 and made.json() == {"username": "alice", "admin": False}
    cookie = made.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age" not in cookie and "expires" not in cookie
    wrong = httpx.post(f"{url}/auth/login", json={"username": "alice", "password": "not it at all"})
    assert wrong.status_code == 401 and wrong.json() == {"error": "Wrong username or password."}
    page = Visitor(running).call("login", "alice", "not it at all")
    assert page["login-notice"] == "Wrong username or password." and "whoami" not in page
