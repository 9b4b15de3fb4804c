"""The Gradio interface: login and sign-up, the chat, the memory panel and the admin page.

Who is logged in lives in a gr.State, which Gradio keeps on the server for each browser session
(a client cannot set it). Every handler passes it to the service, which checks it again; hiding
the admin tab is a convenience, not the protection.
"""

from __future__ import annotations

import functools

import gradio as gr
import pandas as pd

from storage import NotFound, StorageError

from .plots import adapter_figure
from .service import AccessDenied, ChatService, LoginFailed, ReplyStats

TITLE = "memchat"
SNAPSHOT_COLUMNS = ["version", "created_at", "cursor", "tokens_absorbed", "bytes", "sha256", "generator", "messages",
                    "seconds", "rebuild"]
INTRO = ("A chatbot that remembers you: what you say is compressed, in the background, into a small "
         "adapter for a frozen language model, instead of being re-read every turn.")


# What the service refuses on purpose; anything else is a bug and stays a server error.
_REFUSALS = (AccessDenied, LoginFailed, NotFound, StorageError, ValueError)


def _user_errors(fn):
    """Turn the service's refusals into messages shown to the person (and to API clients)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _REFUSALS as e:
            raise gr.Error(str(e)) from None
    return wrapper


def _streaming_user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except _REFUSALS as e:
            raise gr.Error(str(e)) from None
    return wrapper


def _chat_messages(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["text"]} for m in history]


def _memory_markdown(status: dict) -> str:
    version = f"v{status['adapter_version']}" if status["adapter_version"] else "none yet"
    lines = [
        f"**Adapter**: {version}" + (f", last compressed {status['last_compression']} UTC"
                                     if status["last_compression"] else ""),
        f"**In memory**: {status['absorbed_messages']} messages, {status['absorbed_tokens']} tokens",
        f"**Waiting to be absorbed**: {status['pending_messages']} messages, {status['pending_tokens']} tokens",
    ]
    if status["needs_rebuild"]:
        lines.append("**Rebuilding** from your remaining history (answers use no adapter until it is done)")
    job = status["job"]
    if job:
        line = f"**Compression**: {job['status']}"
        if job["attempts"]:
            line += f", attempt {job['attempts']}"
        if job["error"]:
            line += f"; last error: `{job['error'][:200]}` (retrying after {job['not_before']} UTC)"
        lines.append(line)
    return "  \n".join(lines)


def build_ui(service: ChatService) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as ui:
        session = gr.State(None)

        if service.engine.checkpoint_meta is None:
            gr.Markdown("**Note: this server runs an untrained memory generator.** Conversations are stored and "
                        "compressed into adapters, but the adapters do not remember anything useful yet.",
                        elem_id="untrained-warning")
        with gr.Column(visible=True) as login_box:
            gr.Markdown(f"# {TITLE}\n{INTRO}")
            username = gr.Textbox(label="Username", elem_id="username")
            password = gr.Textbox(label="Password", type="password", elem_id="password")
            with gr.Row():
                login_button = gr.Button("Log in", variant="primary", elem_id="login")
                signup_button = gr.Button("Sign up", elem_id="signup")

        with gr.Column(visible=False) as main_box:
            with gr.Row():
                whoami = gr.Markdown(elem_id="whoami")
                logout_button = gr.Button("Log out", size="sm", scale=0)
            with gr.Tabs():
                with gr.Tab("Chat", id="chat"):
                    chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
                    with gr.Row():
                        message = gr.Textbox(placeholder="Say something…", show_label=False, scale=8,
                                             elem_id="message")
                        send_button = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    reply_stats = gr.Markdown(elem_id="reply-stats")
                with gr.Tab("Memory", id="memory"):
                    memory_status = gr.Markdown(elem_id="memory-status")
                    with gr.Row():
                        refresh_button = gr.Button("Refresh", elem_id="refresh-memory")
                        compress_button = gr.Button("Compress now", elem_id="compress-now")
                    with gr.Row():
                        # custom values pass: the service, not the list shown, decides what a user may touch
                        forget_choice = gr.Dropdown(label="Forget one of your messages", choices=[], scale=4,
                                                    allow_custom_value=True)
                        forget_button = gr.Button("Forget it", variant="stop", scale=1)
                    export_button = gr.Button("Export my data (history + adapter, zip)")
                    export_file = gr.File(label="Your data", interactive=False)
                with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                    users_table = gr.Dataframe(label="Users", interactive=False)
                    with gr.Row():
                        admin_user = gr.Dropdown(label="User", choices=[], scale=3, allow_custom_value=True,
                                                 elem_id="admin-user")
                        admin_refresh = gr.Button("Refresh", scale=1, elem_id="admin-refresh")
                    user_detail = gr.Markdown()
                    snapshots_table = gr.Dataframe(label="Snapshot history", interactive=False)
                    adapter_plot = gr.Plot(label="Adapter")
                    probe_question = gr.Textbox(label="Probe: ask one question three ways", elem_id="probe-question")
                    probe_button = gr.Button("Ask", elem_id="probe")
                    with gr.Row():
                        probe_base = gr.Markdown(label="base model")
                        probe_adapter = gr.Markdown(label="adapter")
                        probe_full = gr.Markdown(label="full history")
                    with gr.Row():
                        rebuild_button = gr.Button("Rebuild from scratch")
                        reset_button = gr.Button("Reset memory", variant="stop")
                        peft_button = gr.Button("Export PEFT adapter")
                        delete_confirm = gr.Checkbox(label="yes, delete this user", value=False)
                        delete_button = gr.Button("Delete user", variant="stop")
                    peft_file = gr.File(label="PEFT adapter", interactive=False)
                    admin_message = gr.Markdown()
                    signup_open = gr.Checkbox(label="Sign-up open", value=service.signup_open)
                    audit_table = gr.Dataframe(label="Audit log", interactive=False)
        timer = gr.Timer(5.0)

        # --- accounts -------------------------------------------------------------------------

        def entered(user_id: int):
            me = service.whoami(user_id)
            return (user_id, gr.update(visible=False), gr.update(visible=True), gr.update(visible=me["is_admin"]),
                    f"Logged in as **{me['username']}**" + (" (admin)" if me["is_admin"] else ""),
                    _chat_messages(service.history(user_id)), "")

        entered_outputs = [session, login_box, main_box, admin_tab, whoami, chatbot, password]

        @_user_errors
        def log_in(_, name, secret):
            return entered(service.log_in(name, secret))

        @_user_errors
        def sign_up(_, name, secret):
            return entered(service.sign_up(name, secret))

        def log_out():
            return None, gr.update(visible=True), gr.update(visible=False), gr.update(visible=False), "", [], ""

        login_button.click(log_in, [session, username, password], entered_outputs, api_name="login")
        password.submit(log_in, [session, username, password], entered_outputs, api_visibility="private")
        signup_button.click(sign_up, [session, username, password], entered_outputs, api_name="signup")
        logout_button.click(log_out, None, entered_outputs, api_name="logout")

        # --- chat ---------------------------------------------------------------------------------

        @_streaming_user_errors
        def chat(user_id, text):
            history = service.history(user_id)  # checks the login first
            text, _ = service.check_message(text)  # nothing is shown or stored before this passes
            shown = _chat_messages(history) + [{"role": "user", "content": text},
                                                                {"role": "assistant", "content": ""}]
            yield shown, "", "…"
            for part in service.reply(user_id, text):
                if isinstance(part, ReplyStats):
                    yield _chat_messages(service.history(user_id)), "", part.line()
                else:
                    shown[-1]["content"] += part
                    yield shown, "", gr.skip()

        send_button.click(chat, [session, message], [chatbot, message, reply_stats], api_name="chat")
        message.submit(chat, [session, message], [chatbot, message, reply_stats], api_visibility="private")

        # --- memory -------------------------------------------------------------------------------

        @_user_errors
        def memory(user_id):
            status = service.memory_status(user_id)
            choices = [(f"#{m['id']} {m['role']}: {m['text'][:60]}", m["id"])
                       for m in service.history(user_id) if m["role"] == "user"]
            return _memory_markdown(status), gr.update(choices=choices, value=None)

        def memory_tick(user_id):
            if user_id is None:
                return gr.skip(), gr.skip()
            return _memory_markdown(service.memory_status(user_id)), gr.skip()

        @_user_errors
        def compress_now(user_id):
            service.compress_now(user_id)
            gr.Info("Compression queued: your newest turns will move into your adapter shortly.")
            return memory(user_id)

        @_user_errors
        def forget(user_id, message_id):
            if message_id is None:
                raise gr.Error("Choose a message to forget.")
            service.forget(user_id, int(message_id))
            gr.Info("Forgotten. Your adapter is being rebuilt without it.")
            status, choices = memory(user_id)
            return status, choices, _chat_messages(service.history(user_id))

        @_user_errors
        def export(user_id):
            return str(service.export(user_id))

        memory_outputs = [memory_status, forget_choice]
        refresh_button.click(memory, [session], memory_outputs, api_name="memory")
        compress_button.click(compress_now, [session], memory_outputs, api_name="compress_now")
        forget_button.click(forget, [session, forget_choice], memory_outputs + [chatbot], api_name="forget")
        export_button.click(export, [session], [export_file], api_name="export")
        timer.tick(memory_tick, [session], memory_outputs, api_visibility="private", show_progress="hidden")

        # --- admin --------------------------------------------------------------------------------

        @_user_errors
        def admin_overview(actor):
            users = service.admin_users(actor)
            choices = [(f"{u['username']} (#{u['id']})", u["id"]) for u in users]
            audit = pd.DataFrame(service.admin_audit(actor), columns=["time", "actor", "action", "user", "details"])
            return pd.DataFrame(users), gr.update(choices=choices), audit, service.signup_open

        @_user_errors
        def admin_detail(actor, user_id):
            if user_id is None:
                raise gr.Error("Choose a user.")
            detail = service.admin_user(actor, user_id)
            summary = service.admin_adapter_summary(actor, user_id)
            figure = adapter_figure(summary, f"user #{user_id}") if summary else None
            snapshots = pd.DataFrame(detail["snapshots"], columns=SNAPSHOT_COLUMNS)
            return _memory_markdown(detail["status"]), snapshots, figure

        @_user_errors
        def admin_probe(actor, user_id, question):
            if user_id is None:
                raise gr.Error("Choose a user.")
            answers = service.admin_probe(actor, user_id, question)
            return tuple(f"**{name}** ({a.prompt_tokens} prompt tokens, {a.seconds:.2f} s)\n\n{a.text}"
                         for name, a in answers.items())

        def admin_action(action):
            @_user_errors
            def run(actor, user_id, *extra):
                if user_id is None:
                    raise gr.Error("Choose a user.")
                result = action(actor, user_id, *extra)
                overview = admin_overview(actor)
                return (result if isinstance(result, str) else None, f"Done: {action.__name__}.", *overview)
            return run

        def rebuild(actor, user_id):
            service.admin_rebuild(actor, user_id)

        def reset(actor, user_id):
            service.admin_reset(actor, user_id)

        def export_peft(actor, user_id):
            return str(service.admin_export_peft(actor, user_id))

        def delete(actor, user_id, confirmed):
            if not confirmed:
                raise gr.Error("Tick the confirmation box first.")
            service.admin_delete_user(actor, user_id)

        @_user_errors
        def set_signup(actor, is_open):
            service.admin_set_signup(actor, is_open)
            return admin_overview(actor)

        overview_outputs = [users_table, admin_user, audit_table, signup_open]
        action_outputs = [peft_file, admin_message] + overview_outputs
        admin_tab.select(admin_overview, [session], overview_outputs, api_visibility="private")
        admin_refresh.click(admin_overview, [session], overview_outputs, api_name="admin_users")
        admin_user.change(admin_detail, [session, admin_user], [user_detail, snapshots_table, adapter_plot],
                          api_name="admin_user")
        probe_button.click(admin_probe, [session, admin_user, probe_question], [probe_base, probe_adapter, probe_full],
                           api_name="admin_probe")
        rebuild_button.click(admin_action(rebuild), [session, admin_user], action_outputs, api_name="admin_rebuild")
        reset_button.click(admin_action(reset), [session, admin_user], action_outputs, api_name="admin_reset")
        peft_button.click(admin_action(export_peft), [session, admin_user], action_outputs,
                          api_name="admin_export_peft")
        delete_button.click(admin_action(delete), [session, admin_user, delete_confirm], action_outputs,
                            api_name="admin_delete")
        signup_open.input(set_signup, [session, signup_open], overview_outputs, api_name="admin_signup")
    return ui
