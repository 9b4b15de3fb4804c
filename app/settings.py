"""Settings of the app: every flag of `python app.py` also has an environment variable.

Read before anything heavy is imported (app.py answers the port with the loading page first), so
this module imports neither torch nor the model code: the defaults it shares with them are
checked equal by tests/app/test_settings.py."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ROLES = ("all", "web", "worker")
"""What one process does: everything (one machine), the page and the API only (a web replica), or
compressions only (a worker); replicas and workers share one database (docs/deploy.md)."""
COMPRESSORS = ("finetune", "generator")
"""adapter_core.memory.compressor.COMPRESSORS."""
SNAPSHOT_STORES = ("files", "database")
"""storage.settings.SNAPSHOT_STORES."""
MAX_NEW_TOKENS = 160
"""adapter_core.serving.sampling.SamplingConfig.max_new_tokens."""

ENV_PREFIX = "MEMCHAT_"


def _setting(default, doc: str):
    return field(default=default, metadata={"help": doc})


def _limit(default: str, doc: str):
    """A rate limit written as 'N/period' ('12/minute', '20/15 minutes'), checked when read."""
    return field(default=default, metadata={"help": f"{doc}, as N/period", "limit": True})


def _secret(doc: str):
    """A value read only from the environment (a flag would show in `ps`), never printed."""
    return field(default=None, repr=False, metadata={"help": doc, "secret": True})


@dataclass
class AppSettings:
    role: str = field(default="all", metadata={
        "help": "all: the page, the API and the compressions in this one process; web: the page and the API "
                "(a replica); worker: compressions only, claimed from the shared database",
        "choices": ROLES})
    data_dir: Path = _setting(Path("data"), "folder of the SQLite database, the adapter files and the model cache")
    database_url: str | None = field(default=None, metadata={
        "help": "any SQLAlchemy URL; default: SQLite at <data-dir>/memchat.db (one with a password belongs in the "
                "variable, not the flag)", "url": True})
    snapshot_store: str = field(default="files", metadata={
        "help": "where adapter snapshots are kept: files (in the data folder) or database (beside the rows: "
                "replicas and workers on several machines then share only the database)",
        "choices": SNAPSHOT_STORES})
    model: str | None = _setting(None, "base model: Hugging Face id or local folder; default: embedded SmolLM2-135M")
    checkpoint: str | None = _setting(None, "generator folder; default: the one shipped for the default model")
    compressor: str = field(default="finetune", metadata={
        "help": "how a user's turns become their adapter: finetune (a LoRA pair per user, fine-tuned on the CPU; "
                "remembers now) or generator (one pass of the generator; remembers once it is trained)",
        "choices": COMPRESSORS})
    device: str | None = _setting(None, "cpu or cuda; default: cuda when available")
    int4_decode: bool = _setting(True, "on the CPU, decode on the 4-bit weights of the model file (faster replies)")
    host: str = _setting("127.0.0.1", "interface to listen on; the default serves this machine only")
    port: int = _setting(7860, "port to listen on")
    forwarded_allow_ips: str | None = _setting(None, "behind a reverse proxy: its address(es), whose "
                                                     "X-Forwarded-For then names the client")
    cors_origins: str | None = _setting(None, "web origins whose pages may call the API under /v1 from a browser, "
                                              "comma-separated (e.g. https://chat.example.org); default: none")
    admin_username: str | None = _setting(None, "created (or promoted) as admin at start, with its password")
    admin_password: str | None = _secret("password of that admin account")
    admin_password_file: Path | None = _setting(None, "file holding that password (instead of the variable)")
    allow_signup: bool = _setting(True, "anyone may create an account (admins can change this at run time)")
    compress_every: int = _setting(4, "compress a user's new turns once this many of their messages are pending")
    compress_idle_seconds: float = _setting(120.0, "...or once their newest message is this old (0: never)")
    worker_poll_seconds: float = _setting(1.0, "how often the background worker looks for due work")
    max_new_tokens: int = _setting(MAX_NEW_TOKENS, "longest reply, in tokens (most end sooner, "
                                                                   "at the end of their turn)")
    max_message_chars: int = _setting(4000, "longest chat message, in characters (each costs model time)")
    # --- rate limits
    rate_limit_storage: str = field(default="memory://", metadata={
        "help": "where the rate limits are counted: memory:// (this process) or redis://host:port (shared by "
                "web replicas; one with a password belongs in the variable)", "url": True})
    login_failures_per_name: str = _limit("5/15 minutes", "wrong passwords for one username from one address")
    login_failures_per_address: str = _limit("20/15 minutes", "wrong passwords from one address, any username")
    signups_per_address: str = _limit("5/hour", "new accounts from one address")
    signups_per_server: str = _limit("100/hour", "new accounts in all")
    messages_per_user: str = _limit("12/minute", "chat messages of one user (each costs a reply)")
    actions_per_user: str = _limit("6/minute", "exports, compress-now and admin probes of one user")
    recent_token_budget: int = _setting(3072, "most tokens of not-yet-absorbed turns kept in a prompt")
    max_prompt_tokens: int = _setting(4096, "most tokens of a reply's prompt in all: system text, earlier turns "
                                            "and message (longer instructions or messages are refused; earlier "
                                            "turns are dropped, earliest first)")
    turn_queue_seconds: float = _setting(120.0, "longest an API request waits for the same user's running reply "
                                                "before it is refused with 429 (the page refuses at once)")
    turn_queue_depth: int = _setting(4, "most API requests of one user waiting behind their running reply")

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ: dict[str, str] | None = None) -> "AppSettings":
        """Defaults, overridden by MEMCHAT_* environment variables, overridden by flags."""
        environ = os.environ if environ is None else environ
        # allow_abbrev=False: '--admin-password x' must not be read as '--admin-password-file x'
        parser = _Parser(description="Memory chat: a chatbot that remembers you in its weights.", allow_abbrev=False)
        secrets = {}
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = ENV_PREFIX + f.name.upper()
            default = _convert(f, environ[env]) if env in environ else f.default
            if f.metadata.get("secret"):
                secrets[f.name] = default
                parser.epilog = (parser.epilog or "") + f"{env}: {f.metadata['help']} (environment only). "
                continue
            shown = redact_url(default) if f.metadata.get("url") else default
            help_text = f"{f.metadata['help']} (env {env}; now {shown})"
            if f.type == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            else:
                parser.add_argument(flag, type=lambda v, f=f: _convert(f, v), default=default, help=help_text,
                                    choices=f.metadata.get("choices"))
        settings = cls(**vars(parser.parse_args(argv)), **secrets)
        if settings.admin_password_file is not None:
            try:
                settings.admin_password = settings.admin_password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeError) as e:
                reason = getattr(e, "strerror", None) or e
                parser.error(f"--admin-password-file: cannot read {settings.admin_password_file} ({reason})")
        return settings


def redact_url(url: str | None) -> str | None:
    """A database or Redis URL fit to print: its password replaced by ***."""
    if not url or "@" not in url:  # no user or password in it
        return url
    from sqlalchemy import make_url  # here: settings are read before the heavy imports (see the docstring)

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: print nothing of it
        return "(a URL that cannot be read)"


class _Parser(argparse.ArgumentParser):
    """Says which arguments it did not know, without their values: `--admin-password hunter2` must
    not put the password into a terminal's scrollback or a service's log."""

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [a.split("=", 1)[0] for a in message[len(prefix):].split() if a.startswith("-")]
            message = prefix + (" ".join(flags) or "values that are not flags") + " (values not shown)"
        super().error(message)


def _convert(f, value: str):
    kind = str(f.type)
    if f.metadata.get("limit"):
        from limits import parse  # the rate limits' own parser (app/limits.py), here: see the docstring

        parse(value)  # ValueError if it is not a limit
        return value
    if kind == "bool":
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind.startswith("Path"):
        return Path(value) if value else None
    choices = f.metadata.get("choices")
    if choices and value not in choices:  # argparse checks flags' choices, not a variable's
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
    return value or None
