"""The Gradio interface: login and sign-up, the chat, the memory panel and the admin page.

Who is logged in is the browser's login cookie (app/page_login.py), set by /auth/login or
/auth/signup, which the page's script calls before the Log in and Sign up events: HttpOnly, so no
script reads it, and sent with every event, whose handler acts as that login (`with_login`), never
as a user id and never as what Gradio's session hash last held. A logout elsewhere or a deleted
account ends what this page can do. The services (app/services.py) check the login at every call;
hiding the admin tab is a convenience, not the protection. The services hand back typed results
(frozen dataclasses), read here by attribute.

Refusals (AppError) and faults never raise into Gradio (which would cover the form in "Error"
badges and, for a fault, show the exception's text): they become a message beside the form that
was used (for a fault a generic one, its traceback in the log), and the form stays as it was.
Everything a person or the model wrote is shown as text, never as HTML (see `text_markdown`).
Logging out resets every per-user component and state of the page.
"""

from __future__ import annotations

import functools
import html
import inspect
import re
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import gradio as gr
import pandas as pd

from .api_keys import ApiKeyRow
from .chat import FinishedReply, HistoryMessage, TurnOpened
from .downloads import Download
from .errors import AppError, Busy, Gone, InvalidInput, describe
from .export import DataExport
from .limits import client_address
from .memory import CompressionProgress, MemoryStatus
from .page_login import AUTH_ROUTE, with_login
from .plots import adapter_figure
from .services import Services

TITLE = "memchat"
SNAPSHOT_COLUMNS = ["version", "created", "cursor", "tokens absorbed", "bytes", "sha256", "compressor", "made by (id)",
                    "messages", "new tokens", "seconds", "rebuild"]
USER_COLUMNS = ["id", "username", "admin", "messages", "adapter version", "needs rebuild", "created"]
AUDIT_COLUMNS = ["time", "actor", "action", "user", "details"]
KEY_COLUMNS = ["name", "key", "created", "last used"]
INTRO = ("A chatbot that remembers you: what you say is compressed, in the background, into a small "
         "adapter for a frozen language model, instead of being re-read every turn.")
# The chat's own trash icon would only empty the view, not the history: it is not offered
# (forgetting happens on the Memory tab, through app/memory.py). Its label is translated, so it is
# found by place: with buttons=["copy", "copy_all"] the chat's top panel holds [clear, copy all].
CSS = """
#chatbot .top-panel > button:first-child:not(:only-child) { display: none !important; }
.notice p { color: var(--error-text-color, #b91c1c); font-weight: 600; }
"""
# The browser's time zone, so that times are shown as the person reads a clock.
ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]{1,32}(/[A-Za-z0-9_+\-]{1,32}){0,2}")
"""An IANA zone name ('UTC', 'Europe/Paris', 'America/Argentina/Buenos_Aires'): no '..', at most 98 characters."""
TIMEZONE_JS = "() => Intl.DateTimeFormat().resolvedOptions().timeZone"
# Log in and Sign up first ask /auth (app/page_login.py), which sets the login cookie; the event
# that follows shows the page for that login, or what /auth said in `auth_said`.
AUTH_JS = """async (username, password, said) => {
  try {
    const answer = await fetch("%s/%%s", {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({username, password})});
    const body = await answer.json().catch(() => ({}));
    const refused = (body.error && body.error.message) || body.error || "The server refused: " + answer.status;
    return [username, "", answer.ok ? "" : String(refused)];  // the password went to /auth only
  } catch (e) { return [username, "", "The server cannot be reached; try again in a moment."]; }
}""" % AUTH_ROUTE
# After a logout (the login ended on the server) the browser's cookie is cleared too.
CLEAR_LOGIN_JS = f"""() => {{ fetch("{AUTH_ROUTE}/logout", {{method: "POST", credentials: "same-origin"}}); }}"""


# --- text and times -----------------------------------------------------------------------------

def text_markdown(text: str) -> str:
    """A person's or the model's text for a Markdown component: every '<', '>' and '&' is escaped,
    so that no HTML (a form, an input, a button, a script) can render, whatever the sanitizer
    lets through; and no image loads from an address someone wrote (it would tell that server who
    read the page). Markdown emphasis, lists and links still render."""
    return html.escape(text, quote=False).replace("![", "!\\[")


def name_markdown(name: str) -> str:
    """A username inside Markdown: '_a_' stays '_a_', not an italic 'a'."""
    return re.sub(r"([\\`*_~\[\]])", r"\\\1", text_markdown(name))


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def local_time(value: str | datetime | None, zone: str | None) -> str:
    """An ISO time (UTC when it carries no zone) as the reader's local time, e.g. '27 Nov 2026, 14:05 CET'."""
    if not value:
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if zone is not None and not (isinstance(zone, str) and ZONE_NAME.fullmatch(zone)):
        # the hidden field is an input of the page's API like any other: a client may send anything
        raise InvalidInput("time zone", "is not the name of a time zone")
    try:
        moment = moment.astimezone(ZoneInfo(zone)) if zone else moment
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass  # a zone this server does not know: UTC, and the label says so
    return f"{moment.day} {moment:%b %Y, %H:%M} {moment.tzname() or ''}".rstrip()


def _empty(columns: list[str]) -> pd.DataFrame:
    """A table with its headings and no rows (Gradio would show '1 2 3' for none)."""
    return pd.DataFrame(columns=columns)


def _notice(text: str) -> str:
    return text_markdown(text) if text else ""


def _download_html(download: Download, what: str) -> str:
    minutes = max(1, round((download.expires_at - datetime.now().timestamp()) / 60))
    return (f'<a href="{html.escape(download.url)}" download="{html.escape(download.filename)}">'
            f"Download {html.escape(what)}</a> ({html.escape(download.filename)}; the link works from this "
            f"browser for {plural(minutes, 'minute')}, then the file is deleted)")


def _export_html(made: DataExport) -> str:
    """The link to a user's export, and what it holds of their adapter."""
    if made.adapter_version is not None:
        held = f" It holds your history and adapter v{made.adapter_version}."
    elif made.rebuilding:
        held = (" Your adapter is being rebuilt (after a forget), so it is not in this export: export again once "
                "the memory status says the rebuild is done.")
    else:
        held = " It holds your history; you have no adapter yet."
    return _download_html(made.download, "your data") + html.escape(held)


def _key_label(key: ApiKeyRow, zone: str | None) -> str:
    used = f"last used {local_time(key.last_used_at, zone)}" if key.last_used_at else "never used"
    return f"{key.name or '(no name)'} · {key.hint} · {used}"


def _keys_table(keys: tuple[ApiKeyRow, ...], zone: str | None) -> pd.DataFrame:
    rows = [[k.name or "", k.hint, local_time(k.created_at, zone), local_time(k.last_used_at, zone) or "never"]
            for k in keys]
    return pd.DataFrame(rows, columns=KEY_COLUMNS)


def _chat_messages(history: tuple[HistoryMessage, ...]) -> list[dict]:
    return [{"role": m.role, "content": text_markdown(m.text)} for m in history]


def _memory_markdown(status: MemoryStatus, zone: str | None, *, admin: bool = False) -> str:
    if status.adapter_version:
        how = {"finetune": "fine-tuned", "generator": "written by the generator"}.get(status.compressor, status.compressor)
        cost = ""
        if status.compression_tokens is not None and status.compression_seconds is not None:
            cost = f" on {plural(status.compression_tokens, 'new token')} in {status.compression_seconds:,.0f} s"
        adapter = f"v{status.adapter_version}, {how}{cost}, {local_time(status.last_compression, zone)}"
    else:
        adapter = "none yet"
    lines = [
        f"**Adapter**: {adapter}",
        f"**In memory**: {plural(status.absorbed_messages, 'message')}, {plural(status.absorbed_tokens, 'token')}",
        f"**Waiting to be absorbed**: {plural(status.pending_messages, 'message')}, "
        f"{plural(status.pending_tokens, 'token')}",
    ]
    if status.needs_rebuild:
        lines.append("**Rebuilding** from the remaining history (answers use no adapter until it is done)")
    job = status.job
    if job:
        line = "**Compression**: " + {"queued": "waiting its turn", "running": "running now"}.get(
            job.status, job.status)
        if job.status == "running" and status.progress is not None:
            line += _progress_text(status.progress)
        if job.error:
            line += f"; the last attempt failed, next try {local_time(job.not_before, zone)}"
            if admin:  # the error text is for the people who run the server
                line += f" (error: {text_markdown(job.error[:200])})"
        lines.append(line)
    return "  \n".join(lines)


def _progress_text(progress: CompressionProgress) -> str:
    if not progress.steps:
        return f", preparing, {progress.seconds:,.0f} s so far"
    text = f", step {progress.steps_done} of {progress.steps}, {progress.seconds:,.0f} s so far"
    if progress.seconds_left is not None:
        text += f", about {progress.seconds_left:,.0f} s left"
    return text


# --- handlers' guard ----------------------------------------------------------------------------

def guarded(action: str, outputs: int | gr.Markdown):
    """Refusals and faults of a handler become a message in its last output (its notice); the
    other outputs are left as they are, so the form stays usable. For a handler that returns
    {component: update}, `outputs` is its notice component (one of its outputs)."""
    def failed(error: Exception) -> tuple | dict:
        message = _notice(describe(error, action))
        return {outputs: message} if isinstance(outputs, gr.Markdown) else (*[gr.skip()] * (outputs - 1), message)

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def streaming(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - describe() logs faults with their traceback
                    yield failed(e)
            return streaming

        @functools.wraps(fn)
        def plain(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                return failed(e)
        return plain
    return wrap


def _sendable(text: object) -> bool:
    """Text the page can be sent back (a lone surrogate cannot travel as UTF-8)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- the page -----------------------------------------------------------------------------------

def build_ui(services: Services) -> gr.Blocks:
    accounts, chat_service, memory_service, exports, admin, api_keys = (
        services.accounts, services.chat, services.memory, services.exports, services.admin, services.api_keys)
    rules = services.storage.settings
    with gr.Blocks(title=TITLE) as ui:
        # what waits for "Yes", each with the id of the account that asked (see `confirmed`)
        pending_forget = gr.State(None)  # (asker, message id)
        pending_admin = gr.State(None)   # (asker, (action, user id))
        pending_mine = gr.State(None)    # (asker, (action, key id or None)) of the user's own
        zone = gr.Textbox(value="UTC", visible=False, elem_id="timezone")

        if services.engine.checkpoint_meta is None and services.memory.compressor.name == "generator":
            gr.Markdown("**Note: this server runs an untrained memory generator.** Conversations are stored and "
                        "compressed into adapters, but the adapters do not remember anything useful yet.",
                        elem_id="untrained-warning")
        with gr.Column(visible=True) as login_box:
            gr.Markdown(f"# {TITLE}\n{INTRO}")
            # no max_length: the browser would cut what is pasted silently; the server says what is too long
            username = gr.Textbox(label="Username", elem_id="username")
            password = gr.Textbox(label="Password", type="password", elem_id="password")
            gr.Markdown(f"Usernames: {rules.username_max_chars} characters at most, letters and digits of one "
                        f"alphabet, and '.', '_' or '-'. Passwords: at least {rules.password_min_chars} characters, "
                        "not the username.",
                        elem_id="account-rules")
            with gr.Row():
                login_button = gr.Button("Log in", variant="primary", elem_id="login")
                signup_button = gr.Button("Sign up", elem_id="signup")
            login_notice = gr.Markdown(elem_id="login-notice", elem_classes="notice")
            auth_said = gr.Textbox(visible=False)  # what /auth refused with ("" when it let in): AUTH_JS
        with gr.Column(visible=False) as main_box:
            with gr.Row():
                whoami = gr.Markdown(elem_id="whoami")
                logout_button = gr.Button("Log out", size="sm", scale=0, elem_id="logout")
                logout_all_button = gr.Button("Log out everywhere", size="sm", scale=0, elem_id="logout-everywhere")
            with gr.Tabs():
                with gr.Tab("Chat", id="chat"):
                    chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot",
                                         buttons=["copy", "copy_all"], allow_tags=False)
                    with gr.Row():
                        message = gr.Textbox(placeholder="Say something…", show_label=False, scale=8,
                                             elem_id="message")
                        send_button = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    chat_notice = gr.Markdown(elem_id="chat-notice", elem_classes="notice")
                    reply_stats = gr.Markdown(elem_id="reply-stats")
                with gr.Tab("Memory", id="memory") as memory_tab:
                    memory_status = gr.Markdown(elem_id="memory-status")
                    with gr.Row():
                        refresh_button = gr.Button("Refresh", elem_id="refresh-memory")
                        compress_button = gr.Button("Compress now", elem_id="compress-now")
                    with gr.Row():
                        # custom values pass: the services, not the list shown, decide what a user may touch
                        forget_choice = gr.Dropdown(label="Forget one of your messages (and the reply to it)",
                                                    choices=[], scale=4, allow_custom_value=True,
                                                    elem_id="forget-choice")
                        forget_button = gr.Button("Forget it", variant="stop", scale=1, elem_id="forget")
                    with gr.Row(visible=False) as forget_confirm:
                        forget_question = gr.Markdown(elem_id="forget-question")
                        forget_yes = gr.Button("Yes, forget", variant="stop", scale=0, elem_id="forget-yes")
                        forget_no = gr.Button("Cancel", scale=0, elem_id="forget-no")
                    export_button = gr.Button("Export my data (history + adapter, zip)", elem_id="export")
                    export_link = gr.HTML(elem_id="export-link")
                    # API keys: what an OpenAI-compatible client (app/openai_api.py) acts as you with
                    with gr.Row():
                        key_name = gr.Textbox(label="Name of a new API key (which client will use it)", scale=4,
                                              info="Any OpenAI-compatible chat client can use your memory: base "
                                                   "URL this address + /v1, model memchat, and a key made here.",
                                              elem_id="key-name")
                        create_key_button = gr.Button("Create API key", scale=1, elem_id="create-key")
                    # shown once: only the key's hash is kept, so it cannot be shown again
                    new_key = gr.Textbox(label="Your new key: copy it now, it is shown only this once",
                                         interactive=False, visible=False, buttons=["copy"], elem_id="new-key")
                    keys_table = gr.Dataframe(_empty(KEY_COLUMNS), label="Your API keys", interactive=False,
                                              elem_id="keys")
                    with gr.Row():
                        key_choice = gr.Dropdown(label="Revoke one of your keys (clients using it stop working)",
                                                 choices=[], scale=4, allow_custom_value=True, elem_id="key-choice")
                        revoke_key_button = gr.Button("Revoke it", variant="stop", scale=1, elem_id="revoke-key")
                    with gr.Row():
                        forget_all_button = gr.Button("Forget everything", variant="stop", elem_id="forget-all")
                        delete_me_button = gr.Button("Delete my account", variant="stop", elem_id="delete-me")
                    with gr.Row(visible=False) as mine_confirm:
                        mine_question = gr.Markdown(elem_id="mine-question")
                        mine_yes = gr.Button("Yes", variant="stop", scale=0, elem_id="mine-yes")
                        mine_no = gr.Button("Cancel", scale=0, elem_id="mine-no")
                    memory_notice = gr.Markdown(elem_id="memory-notice", elem_classes="notice")
                with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                    users_table = gr.Dataframe(_empty(USER_COLUMNS), label="Users", interactive=False,
                                               elem_id="admin-users")
                    with gr.Row():
                        admin_user = gr.Dropdown(label="User", choices=[], scale=3, allow_custom_value=True,
                                                 elem_id="admin-user")
                        admin_refresh = gr.Button("Refresh", scale=1, elem_id="admin-refresh")
                    user_detail = gr.Markdown(elem_id="admin-detail")
                    with gr.Row():
                        admin_key = gr.Dropdown(label="The user's API keys", choices=[], scale=4,
                                                allow_custom_value=True, elem_id="admin-key")
                        admin_revoke_key = gr.Button("Revoke key", variant="stop", scale=1, elem_id="admin-revoke-key")
                    snapshots_table = gr.Dataframe(_empty(SNAPSHOT_COLUMNS), label="Snapshot history",
                                                   interactive=False, elem_id="admin-snapshots")
                    adapter_plot = gr.Plot(label="Adapter", elem_id="admin-plot")
                    probe_question = gr.Textbox(label="Probe: ask one question three ways (about a minute)",
                                                elem_id="probe-question")
                    probe_button = gr.Button("Ask", elem_id="probe")
                    # a visible status line: the probe takes about a minute, its progress shows here
                    probe_status = gr.Markdown(elem_id="probe-status", min_height=48)
                    with gr.Row():
                        probe_base = gr.Markdown(elem_id="probe-base")
                        probe_adapter = gr.Markdown(elem_id="probe-adapter")
                        probe_full = gr.Markdown(elem_id="probe-full")
                    with gr.Row():
                        rebuild_button = gr.Button("Rebuild from scratch", elem_id="admin-rebuild")
                        reset_button = gr.Button("Reset memory", variant="stop", elem_id="admin-reset")
                        peft_button = gr.Button("Export PEFT adapter", elem_id="admin-peft")
                        delete_button = gr.Button("Delete user", variant="stop", elem_id="admin-delete")
                    with gr.Row(visible=False) as admin_confirm:
                        admin_question = gr.Markdown(elem_id="admin-question")
                        admin_yes = gr.Button("Yes", variant="stop", scale=0, elem_id="admin-yes")
                        admin_no = gr.Button("Cancel", scale=0, elem_id="admin-no")
                    admin_link = gr.HTML(elem_id="admin-link")
                    admin_notice = gr.Markdown(elem_id="admin-notice", elem_classes="notice")
                    signup_open = gr.Checkbox(label="Sign-up open", value=accounts.signup_open,
                                              elem_id="signup-open")
                    audit_table = gr.Dataframe(_empty(AUDIT_COLUMNS), label="Audit log", interactive=False,
                                               elem_id="admin-audit")
        timer = gr.Timer(5.0)
        ui.load(None, None, zone, js=TIMEZONE_JS)

        # --- accounts -------------------------------------------------------------------------

        # What a page shows for nobody logged in; logging out puts every one of these back. Made
        # anew for each use: Gradio consumes the "value" of an update dict it sends, so a shared one
        # would reset a component's value only the first time (and a shown API key would stay).
        def blank() -> dict:
            return {
                pending_forget: None, pending_admin: None, pending_mine: None,
                mine_confirm: gr.update(visible=False), mine_question: "",
                login_box: gr.update(visible=True), main_box: gr.update(visible=False),
                admin_tab: gr.update(visible=False), whoami: "", username: "", password: "", login_notice: "",
                chatbot: [], message: "", chat_notice: "", reply_stats: "",
                memory_status: "", forget_choice: gr.update(choices=[], value=None),
                forget_confirm: gr.update(visible=False), forget_question: "", export_link: "", memory_notice: "",
                key_name: "", new_key: gr.update(value="", visible=False), keys_table: _empty(KEY_COLUMNS),
                key_choice: gr.update(choices=[], value=None), admin_key: gr.update(choices=[], value=None),
                users_table: _empty(USER_COLUMNS), admin_user: gr.update(choices=[], value=None), user_detail: "",
                snapshots_table: _empty(SNAPSHOT_COLUMNS), adapter_plot: None, probe_question: "", probe_status: "",
                probe_base: "", probe_adapter: "", probe_full: "", admin_confirm: gr.update(visible=False),
                admin_question: "", admin_link: "", admin_notice: "", audit_table: _empty(AUDIT_COLUMNS),
            }
        page_outputs = list(blank())

        def entered(login: str) -> dict:
            me = accounts.whoami(login)
            return blank() | {
                login_box: gr.update(visible=False), main_box: gr.update(visible=True),
                admin_tab: gr.update(visible=me.is_admin),
                whoami: f"Logged in as **{name_markdown(me.username)}**" + (" (admin)" if me.is_admin else ""),
                chatbot: _chat_messages(chat_service.history(login)),
            }

        def refused(notice_text: str) -> dict:
            """Only the notice changes: what was typed stays, so it can be corrected."""
            return {login_notice: _notice(notice_text)}

        def enter(login, _name, _password, said):
            """After /auth: the page of the login it set, or what it refused with."""
            if said:
                return refused(str(said)[:500])
            try:
                return entered(login)
            except Exception as e:  # noqa: BLE001 - describe() logs faults with their traceback
                return refused(describe(e, "log in"))

        def reopened(login):
            """A page opened (or reloaded) in a browser still logged in shows that login's page."""
            nothing = {login_notice: gr.skip()}  # (Gradio reads an empty dict as one value)
            if login is None:
                return nothing
            try:
                return entered(login)
            except AppError:  # ended or expired: the login view, as for anyone
                return nothing

        def log_out(login):
            accounts.log_out(login)
            return blank()

        def log_out_everywhere(login):
            ended = accounts.log_out(login, everywhere=True)
            if ended > 1:
                gr.Info(f"Logged out on {plural(ended, 'browser')}.")
            return blank()

        auth_inputs = [username, password, auth_said]
        login_button.click(with_login(enter), auth_inputs, page_outputs, js=AUTH_JS % "login", api_name="login")
        password.submit(with_login(enter), auth_inputs, page_outputs, js=AUTH_JS % "login", api_visibility="private")
        signup_button.click(with_login(enter), auth_inputs, page_outputs, js=AUTH_JS % "signup", api_name="signup")
        ui.load(with_login(reopened), None, page_outputs, api_visibility="private")

        # --- chat ---------------------------------------------------------------------------------

        def chat(user_id, text):
            # The message box and the notice are emptied once, when the message is taken; the
            # streamed updates leave them alone, so that what the person types meanwhile stays.
            typed, opened = text, False
            try:
                written, shown = "", []
                # the turn itself reads the history, stored message last (one transaction for both)
                for part in chat_service.reply(user_id, text, with_history=True):
                    if isinstance(part, TurnOpened):
                        opened = True
                        shown = _chat_messages(part.history) + [{"role": "assistant", "content": "…"}]
                        yield shown, "", "…", ""
                    elif isinstance(part, FinishedReply):  # the reply as stored: no need to read the history again
                        shown[-1]["content"] = text_markdown(part.text)
                        yield shown, gr.skip(), part.stats.line(), gr.skip()
                    else:
                        written += part
                        shown[-1]["content"] = text_markdown(written)
                        yield shown, gr.skip(), gr.skip(), gr.skip()
            except Exception as e:  # noqa: BLE001 - a refused message is back in the box to be sent
                # again; once the message was stored, the view shows the history as stored
                notice = _notice(describe(e, "chat"))  # first: a fault is logged even if reading the history fails
                # a refused message goes back in the box, but not one refused while the previous turn
                # runs (Busy): the box still holds it, and putting it back would undo a double click's clearing
                back = isinstance(e, AppError) and not isinstance(e, Busy) and _sendable(typed) and not opened
                box = typed if back else gr.skip()
                view = _chat_messages(chat_service.history(user_id)) if opened else gr.skip()
                yield view, box, gr.skip() if not opened else "", notice

        chat_outputs = [chatbot, message, reply_stats, chat_notice]
        running = []  # events that can outlive a logout: logging out cancels them (see the end)
        # as many replies at once as the inference loop decodes together (Gradio's default would cap them at 4)
        replies_at_once = chat_service.loop.max_rows
        # trigger_mode "multiple": a Send while the reply streams reaches the server, which says why
        # it waits (one turn at a time), instead of the browser dropping the click without a word
        running.append(send_button.click(guarded("chat", 4)(with_login(chat)), [message], chat_outputs, api_name="chat",
                                         concurrency_limit=replies_at_once, concurrency_id="chat",
                                         trigger_mode="multiple"))
        running.append(message.submit(guarded("chat", 4)(with_login(chat)), [message], chat_outputs,
                                      api_visibility="private", concurrency_limit=replies_at_once, trigger_mode="multiple",
                                      concurrency_id="chat"))
        # should a client still send the chat's "clear" event, the view shows the stored history again
        chatbot.clear(guarded("show history", 2)(with_login(lambda login: (_chat_messages(chat_service.history(login)), ""))),
                      None, [chatbot, chat_notice], api_visibility="private")

        # --- memory -------------------------------------------------------------------------------

        def memory_view(user_id, tz) -> tuple:
            status = memory_service.status(user_id)
            choices = [(f"{local_time(m.created_at, tz)} · {m.text[:60]}", m.id)
                       for m in chat_service.history(user_id) if m.role == "user"]
            return _memory_markdown(status, tz), gr.update(choices=choices, value=None)

        def memory(user_id, tz):
            return (*memory_view(user_id, tz), "")

        def memory_tick(user_id, tz):
            try:
                return _memory_markdown(memory_service.status(user_id), tz), gr.skip(), gr.skip()
            except AppError:  # nobody logged in, or a login that ended: the page shows nothing to refresh
                return gr.skip(), gr.skip(), gr.skip()

        def compress_now(user_id, tz):
            memory_service.compress_now(user_id)
            gr.Info("Compression queued: your newest turns will move into your adapter shortly.")
            return memory(user_id, tz)

        # A page's state is Gradio's, named by its session hash; the login is the browser's cookie.
        # What a question left waiting is done only for the account that asked it: not for another
        # login of this browser since, nor for whoever else sent events under this page's hash.
        def asked(login, what) -> tuple:
            return accounts.whoami(login).id, what

        def confirmed(login, pending):
            """What the question left waiting; refused if none, or if another account asked it."""
            me = accounts.whoami(login)  # a login first, then what is waiting
            if pending is None:
                raise AppError("Nothing is waiting for confirmation")
            asker, what = pending
            if asker != me.id:
                raise AppError("That question was asked by another login: ask again")
            return what

        def ask_forget(user_id, message_id):
            chosen = [m for m in chat_service.history(user_id) if str(m.id) == str(message_id) and m.role == "user"]
            if not chosen:
                raise AppError("Choose one of your messages from the list first")
            excerpt = chosen[0].text[:80] + ("…" if len(chosen[0].text) > 80 else "")
            question = (f"Forget “{text_markdown(excerpt)}” and the reply to it? Your adapter is rebuilt "
                        "without them; this cannot be undone.")
            return asked(user_id, chosen[0].id), gr.update(visible=True), question, ""

        def forget(user_id, pending, tz):
            message_id = confirmed(user_id, pending)
            deleted = memory_service.forget(user_id, message_id)
            gr.Info(f"Forgotten ({plural(deleted, 'message')}). Your adapter is being rebuilt without them.")
            # the export link shown before is dead (it held what was forgotten): it goes too
            return (None, gr.update(visible=False), *memory_view(user_id, tz),
                    _chat_messages(chat_service.history(user_id)), "", "")

        def cancel_forget():
            return None, gr.update(visible=False), ""

        def export(user_id, request: gr.Request):
            return _export_html(exports.my_data(user_id, client_address(request))), ""

        def keys_view(user_id, tz) -> tuple:
            keys = api_keys.mine(user_id)
            return _keys_table(keys, tz), gr.update(choices=[(_key_label(k, tz), k.id) for k in keys], value=None)

        def show_keys(user_id, tz):
            return (*keys_view(user_id, tz), "")

        def create_key(user_id, name, tz):
            made = api_keys.create(user_id, name)
            gr.Info("API key created. Copy it now: it is not shown again.")
            return gr.update(value=made.secret, visible=True), "", *keys_view(user_id, tz), ""

        # --- the user's own irreversible actions: asked first, then done at "Yes"

        def ask_mine(action):
            def ask(user_id, key_id=None):
                asker = accounts.whoami(user_id).id  # a login first, then what was chosen
                if action == "revoke":
                    if key_id is None:
                        raise AppError("Choose one of your keys from the list first")
                    chosen = [k for k in api_keys.mine(user_id) if str(k.id) == str(key_id)]
                    if not chosen:
                        raise Gone()
                    question = (f"Revoke the key {chosen[0].hint}? Clients that use it are refused from then on; "
                                "this cannot be undone.")
                    return {pending_mine: (asker, (action, chosen[0].id)), mine_confirm: gr.update(visible=True),
                            mine_question: question, memory_notice: ""}
                question = {"forget all": "Forget everything? Every message and adapter of yours is deleted; your "
                                          "account and API keys stay. This cannot be undone.",
                            "delete": "Delete your account? Your history, adapters and API keys are deleted and "
                                      "you are logged out; the admins' audit log keeps your name beside what was "
                                      "done. This cannot be undone."}[action]
                return {pending_mine: (asker, (action, None)), mine_confirm: gr.update(visible=True), mine_question: question,
                        memory_notice: ""}
            return ask

        def mine_confirmed(user_id, pending, tz):
            action, key_id = confirmed(user_id, pending)
            asked = {pending_mine: None, mine_confirm: gr.update(visible=False), mine_question: ""}
            if action == "delete":
                name = accounts.delete_own(user_id)
                gr.Info(f"The account {name} and everything in it was deleted.")
                return blank()  # the login view: this page's login ended with the account
            if action == "forget all":
                memory_service.forget_everything(user_id)
                gr.Info("Everything was forgotten: your history and your adapter are gone.")
                status, choices = memory_view(user_id, tz)
                return asked | {chatbot: [], memory_status: status, forget_choice: choices, export_link: "",
                                reply_stats: "", memory_notice: ""}
            revoked = api_keys.revoke(user_id, key_id)
            gr.Info(f"Key {revoked.hint} revoked: clients that use it are refused from now on.")
            table, choices = keys_view(user_id, tz)
            # the "copy it now" box may hold the very key: it goes
            return asked | {keys_table: table, key_choice: choices, new_key: gr.update(value="", visible=False),
                            memory_notice: ""}

        memory_outputs = [memory_status, forget_choice, memory_notice]
        refresh_button.click(guarded("memory", 3)(with_login(memory)), [zone], memory_outputs, api_name="memory")
        compress_button.click(guarded("compress now", 3)(with_login(compress_now)), [zone], memory_outputs,
                              api_name="compress_now")
        forget_button.click(guarded("forget", 4)(with_login(ask_forget)), [forget_choice],
                            [pending_forget, forget_confirm, forget_question, memory_notice], api_name="ask_forget")
        running.append(forget_yes.click(guarded("forget", 7)(with_login(forget)), [pending_forget, zone],
                         [pending_forget, forget_confirm, memory_status, forget_choice, chatbot, export_link,
                          memory_notice], api_name="forget"))
        forget_no.click(cancel_forget, None, [pending_forget, forget_confirm, memory_notice],
                        api_visibility="private")
        running.append(export_button.click(guarded("export", 2)(with_login(export)), None, [export_link, memory_notice],
                                           api_name="export"))
        timer.tick(with_login(memory_tick), [zone], memory_outputs, api_visibility="private", show_progress="hidden")
        # the tab shows what it holds when opened (the timer refreshes only the status)
        memory_tab.select(guarded("memory", 3)(with_login(memory)), [zone], memory_outputs, api_visibility="private")
        keys_outputs = [keys_table, key_choice, memory_notice]
        memory_tab.select(guarded("API keys", 3)(with_login(show_keys)), [zone], keys_outputs, api_visibility="private")
        refresh_button.click(guarded("API keys", 3)(with_login(show_keys)), [zone], keys_outputs, api_name="api_keys")
        running.append(create_key_button.click(guarded("create API key", 5)(with_login(create_key)), [key_name, zone],
                                               [new_key, key_name, *keys_outputs], api_name="create_api_key"))
        ask_outputs = [pending_mine, mine_confirm, mine_question, memory_notice]
        revoke_key_button.click(guarded("revoke API key", memory_notice)(with_login(ask_mine("revoke"))),
                                [key_choice], ask_outputs, api_name="ask_revoke_api_key")
        forget_all_button.click(guarded("forget everything", memory_notice)(with_login(ask_mine("forget all"))), None,
                                ask_outputs, api_name="ask_forget_everything")
        delete_me_button.click(guarded("delete account", memory_notice)(with_login(ask_mine("delete"))), None,
                               ask_outputs, api_name="ask_delete_account")
        running.append(mine_yes.click(guarded("confirm", memory_notice)(with_login(mine_confirmed)),
                                      [pending_mine, zone], page_outputs, api_name="confirm_mine"))
        mine_no.click(lambda: (None, gr.update(visible=False), ""), None, [pending_mine, mine_confirm, memory_notice],
                      api_visibility="private")

        # --- admin --------------------------------------------------------------------------------

        def overview(actor, tz) -> tuple:
            users = admin.users(actor)
            choices = [(f"{u.username} (#{u.id})", u.id) for u in users]
            user_rows = [[u.id, u.username, u.admin, u.messages, u.adapter_version, u.needs_rebuild,
                          local_time(u.created_at, tz)] for u in users]
            audit_rows = [[local_time(e.time, tz), e.actor, e.action, e.user, e.details] for e in admin.audit(actor)]
            return (pd.DataFrame(user_rows, columns=USER_COLUMNS), gr.update(choices=choices),
                    pd.DataFrame(audit_rows, columns=AUDIT_COLUMNS), accounts.signup_open)

        def admin_overview(actor, tz):
            return (*overview(actor, tz), "")

        def admin_keys(actor, user_id, tz):
            return gr.update(choices=[(_key_label(k, tz), k.id) for k in admin.api_keys(actor, user_id)], value=None)

        def admin_detail(actor, user_id, tz):
            no_keys = gr.update(choices=[], value=None)
            if user_id is None:
                return "", _empty(SNAPSHOT_COLUMNS), None, no_keys, ""
            try:
                detail = admin.user(actor, user_id)
                keys = admin_keys(actor, user_id, tz)
            except Exception as e:  # noqa: BLE001 - nothing of the user chosen before may stay on screen
                return "", _empty(SNAPSHOT_COLUMNS), None, no_keys, _notice(describe(e, "admin detail"))
            summary = admin.adapter_summary(actor, user_id)
            figure = adapter_figure(summary, f"{detail.username}'s adapter") if summary else None
            rows = [[s.version, local_time(s.created_at, tz), s.cursor, s.tokens_absorbed, s.bytes, s.sha256,
                     s.compressor, s.generator, s.messages, s.new_tokens, s.seconds, s.rebuild] for s in detail.snapshots]
            heading = f"### {name_markdown(detail.username)}\n"
            return (heading + _memory_markdown(detail.status, tz, admin=True),
                    pd.DataFrame(rows, columns=SNAPSHOT_COLUMNS), figure, keys, "")

        def admin_revoke(actor, user_id, key_id, tz):
            if user_id is None:
                raise AppError("Choose a user first")
            if key_id is None:
                raise AppError("Choose one of the user's keys first")
            revoked = admin.revoke_api_key(actor, user_id, key_id)
            gr.Info(f"Key {revoked.hint} revoked.")
            return admin_keys(actor, user_id, tz), ""

        def admin_probe(actor, user_id, question, progress=gr.Progress()):
            if user_id is None:
                raise AppError("Choose a user first")
            progress(0, desc="answering with the base model, the adapter and the full history")
            probe = admin.probe(actor, user_id, question)
            return (f"Answered three ways in {probe.seconds:.0f} s.",
                    *(f"**{a.name}** ({a.prompt_tokens:,} prompt tokens, {a.seconds:.1f} s)\n\n{text_markdown(a.text)}"
                      for a in probe.answers), "")

        # destructive actions ask first; the question names the user
        confirmations = {"reset": "Reset {name}'s memory? Every message and adapter of theirs is deleted; the "
                                  "account stays. This cannot be undone.",
                         "delete": "Delete {name}'s account and all their data? This cannot be undone."}

        def ask_admin(action):
            def ask(actor, user_id):
                if user_id is None:
                    raise AppError("Choose a user first")
                name = admin.deletable(actor, user_id) if action == "delete" else admin.username(actor, user_id)
                question = confirmations[action].format(name=name_markdown(name))
                return asked(actor, (action, user_id)), gr.update(visible=True), question, ""
            return ask

        def admin_confirmed(actor, pending, tz):
            action, user_id = confirmed(actor, pending)
            if action == "reset":
                gr.Info(f"{admin.reset(actor, user_id)}'s memory was reset.")
            else:
                gr.Info(f"{admin.delete_user(actor, user_id)}'s account was deleted.")
            return (None, gr.update(visible=False), *overview(actor, tz), "")

        def rebuild(actor, user_id, tz):
            if user_id is None:
                raise AppError("Choose a user first")
            gr.Info(f"A rebuild of {admin.rebuild(actor, user_id)}'s adapter is queued.")
            return (*overview(actor, tz), "")

        def export_peft(actor, user_id, request: gr.Request):
            if user_id is None:
                raise AppError("Choose a user first")
            return _download_html(admin.export_peft(actor, user_id, client_address(request)),
                                  "the PEFT adapter"), ""

        def set_signup(actor, is_open, tz):
            admin.set_signup(actor, is_open)
            return (*overview(actor, tz), "")

        overview_outputs = [users_table, admin_user, audit_table, signup_open, admin_notice]
        confirm_outputs = [pending_admin, admin_confirm, admin_question, admin_notice]
        admin_tab.select(guarded("admin overview", 5)(with_login(admin_overview)), [zone], overview_outputs,
                         api_visibility="private")
        admin_refresh.click(guarded("admin overview", 5)(with_login(admin_overview)), [zone], overview_outputs,
                            api_name="admin_users")
        running.append(admin_user.change(guarded("admin detail", 5)(with_login(admin_detail)), [admin_user, zone],
                          [user_detail, snapshots_table, adapter_plot, admin_key, admin_notice], api_name="admin_user"))
        admin_revoke_key.click(guarded("revoke API key", 2)(with_login(admin_revoke)), [admin_user, admin_key, zone],
                               [admin_key, admin_notice], api_name="admin_revoke_key")
        running.append(probe_button.click(guarded("probe", 5)(with_login(admin_probe)), [admin_user, probe_question],
                           [probe_status, probe_base, probe_adapter, probe_full, admin_notice],
                           api_name="admin_probe", show_progress_on=[probe_status]))
        rebuild_button.click(guarded("rebuild", 5)(with_login(rebuild)), [admin_user, zone], overview_outputs,
                             api_name="admin_rebuild")
        reset_button.click(guarded("reset", 4)(with_login(ask_admin("reset"))), [admin_user], confirm_outputs,
                           api_name="admin_ask_reset")
        delete_button.click(guarded("delete", 4)(with_login(ask_admin("delete"))), [admin_user], confirm_outputs,
                            api_name="admin_ask_delete")
        running.append(admin_yes.click(guarded("admin action", 7)(with_login(admin_confirmed)), [pending_admin, zone],
                        [pending_admin, admin_confirm, *overview_outputs], api_name="admin_confirm"))
        admin_no.click(lambda: (None, gr.update(visible=False), ""), None,
                       [pending_admin, admin_confirm, admin_notice], api_visibility="private")
        running.append(peft_button.click(guarded("export PEFT", 2)(with_login(export_peft)), [admin_user],
                                         [admin_link, admin_notice], api_name="admin_export_peft"))
        signup_open.input(guarded("sign-up switch", 5)(with_login(set_signup)), [signup_open, zone], overview_outputs,
                          api_name="admin_signup")

        # A reply, export or probe still running would write the last person's data into the
        # page after the logout: logging out cancels them first.
        logout_button.click(with_login(log_out), None, page_outputs, api_name="logout", cancels=running
                            ).then(None, js=CLEAR_LOGIN_JS)
        logout_all_button.click(with_login(log_out_everywhere), None, page_outputs, api_name="logout_everywhere",
                                cancels=running).then(None, js=CLEAR_LOGIN_JS)
    return ui

