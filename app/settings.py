"""Settings of the app: every flag of `python app.py` also has an environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "MEMCHAT_"


@dataclass
class AppSettings:
    data_dir: Path = Path("data")
    """Folder of the SQLite database, the adapter files and the model cache."""
    database_url: str | None = None
    """Any SQLAlchemy URL; None: SQLite at <data_dir>/memchat.db."""
    model: str | None = None
    """Base model: a Hugging Face id or local folder; None: the embedded SmolLM2-135M-Instruct."""
    checkpoint: str | None = None
    """Generator folder; None: the one shipped for the default model (or an untrained one)."""
    device: str | None = None
    """cpu or cuda; None: cuda when available."""
    host: str = "127.0.0.1"
    """Interface to listen on; the default serves this machine only."""
    port: int = 7860
    admin_username: str | None = None
    """Created (or promoted) as an admin at start when given together with admin_password."""
    admin_password: str | None = None
    allow_signup: bool = True
    """Whether anyone may create an account from the login page (admins can turn it off at run time)."""
    compress_every: int = 4
    """Compress a user's new turns after this many of their messages are pending."""
    compress_idle_seconds: float = 120.0
    """...or once their newest message is this old (0 turns the idle trigger off)."""
    worker_poll_seconds: float = 1.0
    """How often the background worker looks for due work."""
    max_new_tokens: int = 200
    """Longest reply."""
    recent_token_budget: int = 3072
    """Most tokens of not-yet-absorbed turns kept in a prompt; older ones wait for compression."""

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ: dict[str, str] | None = None) -> "AppSettings":
        """Defaults, overridden by MEMCHAT_* environment variables, overridden by flags."""
        environ = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(description="Memory chat: a chatbot that remembers you in its weights.")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = ENV_PREFIX + f.name.upper()
            default = _convert(f, environ[env]) if env in environ else f.default
            help_text = f"(env {env}; default {default!r})"
            if f.type in ("bool",):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            else:
                parser.add_argument(flag, type=lambda v, f=f: _convert(f, v), default=default, help=help_text)
        return cls(**vars(parser.parse_args(argv)))


def _convert(f, value: str):
    kind = str(f.type)
    if kind == "bool":
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "Path":
        return Path(value)
    return value or None
