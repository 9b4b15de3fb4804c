"""The app over HTTP with gradio_client, launched on loopback with a tiny model."""

from __future__ import annotations

import json
import zipfile

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.app.helpers import wait_for

ADMIN_ENDPOINTS = {
    "/admin_users": (), "/admin_user": (1,), "/admin_probe": (1, "hi"), "/admin_rebuild": (1,),
    "/admin_reset": (1,), "/admin_export_peft": (1,), "/admin_delete": (1, True), "/admin_signup": (False,),
}


def client(running) -> Client:
    return Client(running.url, verbose=False)


def texts(chatbot: list[dict]) -> list[str]:
    return [part["text"] for m in chatbot for part in m["content"] if part.get("type") == "text"]


def test_sign_up_chat_compress_and_export_over_http(running, password):
    alice = client(running)
    assert alice.predict("alice", password, api_name="/signup")[0] == "Logged in as **alice**"
    chatbot, box, stats = alice.predict("My cat is called Tobrik.", api_name="/chat")
    assert texts(chatbot)[0] == "My cat is called Tobrik." and box == ""
    assert "prompt tokens" in stats and "no adapter yet" in stats
    alice.predict("And I live in Quenmoor.", api_name="/chat")  # the second message triggers compression
    wait_for(lambda: "v1" in alice.predict(api_name="/memory")[0])
    status, _ = alice.predict(api_name="/memory")
    assert "**In memory**: 4 messages" in status
    _, _, stats = alice.predict("What is my cat called?", api_name="/chat")
    assert "adapter v1" in stats
    with zipfile.ZipFile(alice.predict(api_name="/export")) as z:
        history = json.loads(z.read("history.json"))
        assert "adapter/peft/adapter_config.json" in z.namelist()
    assert [m["text"] for m in history["messages"]][0] == "My cat is called Tobrik."


def test_login_is_required_for_everything(running):
    anonymous = client(running)
    for endpoint, args in {"/chat": ("hi",), "/memory": (), "/compress_now": (), "/forget": (1,), "/export": (),
                           **ADMIN_ENDPOINTS}.items():
        with pytest.raises(AppError, match="please log in"):
            anonymous.predict(*args, api_name=endpoint)
    with pytest.raises(AppError, match="wrong username or password"):
        anonymous.predict("root", "not the password", api_name="/login")


def test_a_non_admin_gets_no_admin_data_through_any_endpoint(running, password):
    mallory = client(running)
    mallory.predict("mallory", password, api_name="/signup")
    for endpoint, args in ADMIN_ENDPOINTS.items():
        with pytest.raises(AppError, match="admins only"):
            mallory.predict(*args, api_name=endpoint)
    admin = client(running)
    admin.predict("root", password, api_name="/login")
    users = admin.predict(api_name="/admin_users")[0]
    assert {row[1] for row in users["data"]} == {"root", "mallory"}  # nothing was deleted or changed


def test_user_b_cannot_reach_user_a(running, password):
    alice, bob = client(running), client(running)
    alice.predict("alice", password, api_name="/signup")
    bob.predict("bob", password, api_name="/signup")
    alice.predict("My secret code is 4821.", api_name="/chat")
    alice.predict("Remember it.", api_name="/chat")
    wait_for(lambda: "v1" in alice.predict(api_name="/memory")[0])
    alice_ids = [choice[1] for choice in alice.predict(api_name="/memory")[1]["choices"]]

    status, choices = bob.predict(api_name="/memory")
    assert choices["choices"] == [] and "**Adapter**: none yet" in status
    chatbot, _, _ = bob.predict("hello", api_name="/chat")
    assert "4821" not in json.dumps(chatbot)
    for message_id in alice_ids:  # guessing ids
        with pytest.raises(AppError, match="has no message"):
            bob.predict(message_id, api_name="/forget")
    with zipfile.ZipFile(bob.predict(api_name="/export")) as z:
        assert "4821" not in z.read("history.json").decode()
        assert not any(name.startswith("adapter/") for name in z.namelist())
    assert len(alice.predict(api_name="/memory")[1]["choices"]) == 2  # alice's messages are untouched
