"""The page's pure parts, and the page's wiring checked on the Blocks themselves."""

import logging

import gradio as gr

from app.errors import AppError
from app.ui import build_ui, guarded, local_time, name_markdown, plural, text_markdown
from storage import ValidationError
from tests.app.helpers import browser


def test_text_is_shown_as_text_never_as_html():
    shown = text_markdown('<form action="https://evil.example"><input type="password"><button>Go</button></form>'
                          " & *hi*")
    assert "<" not in shown and ">" not in shown
    assert shown.startswith("&lt;form") and "&amp;" in shown and "*hi*" in shown  # Markdown still renders
    assert "![" not in text_markdown("look ![pixel](https://tracker.example/p.png)")


def test_a_username_is_shown_as_written():
    assert name_markdown("_a_") == "\\_a\\_" and name_markdown("x<b>") == "x&lt;b&gt;"


def test_words_and_times_for_people():
    assert (plural(1, "message"), plural(0, "message"), plural(1200, "token")) == (
        "1 message", "0 messages", "1,200 tokens")
    assert local_time("2026-11-27T13:05:00", "Europe/Berlin") == "27 Nov 2026, 14:05 CET"
    assert local_time("2026-07-01T13:05:00+00:00", "America/New_York") == "1 Jul 2026, 09:05 EDT"
    assert local_time("2026-11-27T13:05:00", "Not/AZone") == "27 Nov 2026, 13:05 UTC"
    assert local_time(None, "UTC") == ""


def test_a_refusal_is_a_notice_and_one_log_line(caplog):
    @guarded("do it", 3)
    def refuse(x):
        raise AppError("Choose a user first")

    with caplog.at_level(logging.INFO):
        result = refuse(1)
    assert result[:2] == (gr.skip(), gr.skip()) and result[2] == "Choose a user first."
    assert [r.exc_info for r in caplog.records] == [None]


def test_a_fault_is_logged_with_its_traceback_and_hidden_from_the_person(caplog):
    @guarded("do it", 2)
    def broken():
        yield 1, ""
        int("not a number")

    results = list(broken())
    assert "Something went wrong on our side" in results[-1][1]
    assert "invalid literal" not in results[-1][1]
    assert any(r.exc_info and "invalid literal" in str(r.exc_info[1]) for r in caplog.records)


def test_logging_out_resets_every_per_user_part_of_the_page(services):
    ui = build_ui(services)
    logout = next(fn for fn in ui.fns.values() if fn.api_name == "logout")
    reset = set(logout.outputs)
    main_box = next(b for b in ui.blocks.values() if isinstance(b, gr.Column) and not b.visible)

    def holders(block):
        for child in getattr(block, "children", []):
            if isinstance(child, gr.components.Component) and not isinstance(child, gr.Button):
                yield child
            yield from holders(child)

    per_user = list(holders(main_box))
    assert len(per_user) > 20  # the server-wide sign-up switch is the one part that is nobody's own
    missing = [b.elem_id or type(b).__name__ for b in per_user if b not in reset and b.elem_id != "signup-open"]
    assert missing == []
    states = [b for b in ui.blocks.values() if isinstance(b, gr.State)]
    assert states and all(s in reset for s in states)  # the server-side state of the session too


def test_a_storage_error_no_service_translated_is_a_fault_not_a_refusal(caplog):
    @guarded("compress now", 2)
    def broken(user_id):
        raise ValidationError("generator_id", "must be text")

    result = broken(1)
    assert result[0] == gr.skip() and result[1].startswith("Something went wrong on our side (reference ")
    assert "generator_id" not in result[1]
    assert any(r.exc_info and isinstance(r.exc_info[1], ValidationError) for r in caplog.records)


def test_a_streamed_reply_leaves_the_message_box_and_notice_alone(services, password, monkeypatch):
    """Only taking the message empties the box: text typed while the reply streams stays, and a
    second message sent meanwhile is refused with the box and the view left as they are."""
    from tests.app.helpers import FakeStream

    alice = browser(services.accounts.sign_up("alice", password).secret)
    monkeypatch.setattr(services.chat.loop, "submit", lambda request: FakeStream(request, ["One.", " Two.", " Three."]))
    ui = build_ui(services)
    chat = next(f.fn for f in ui.fns.values() if f.api_name == "chat")
    updates = list(chat(alice, "hello"))
    first, *later = updates
    assert first[1] == "" and first[3] == ""  # the box and the notice emptied once
    assert len(later) >= 3 and all(u[1] == gr.skip() and u[3] == gr.skip() for u in later)
    assert "One. Two. Three." in later[-1][0][-1]["content"]

    streaming = chat(alice, "first")
    next(streaming)  # the first turn is under way
    refused = list(chat(alice, "second, too soon"))
    assert len(refused) == 1
    view, box, stats, notice = refused[0]
    # the box is left alone: it still holds the text (putting it back would refill a box a double click emptied)
    assert view == gr.skip() and box == gr.skip() and "still being answered" in notice
    list(streaming)


def test_the_hidden_time_zone_is_checked_like_any_input(services, password, caplog):
    """Attacker findings, point 7: a 10,000-character zone wrote a traceback at every call."""
    from tests.app.helpers import chat

    login = services.accounts.sign_up("alice", password)
    chat(services, login.secret, "a message, so that the tab shows times")
    ui = build_ui(services)
    memory = next(f.fn for f in ui.fns.values() if f.api_name == "memory")
    for zone in ("x" * 10_000, "../../etc/passwd", "Europe/../../x", 42):
        caplog.clear()
        notice = memory(browser(login.secret), zone)[-1]
        assert notice == "The time zone is not the name of a time zone."
        assert not any(r.exc_info for r in caplog.records)
    assert memory(browser(login.secret), "Mars/Olympus_Mons")[-1] == ""  # well formed but unknown: UTC, as before
    assert memory(browser(login.secret), "Europe/Paris")[-1] == ""
