"""Many users over HTTP: the app against llama.cpp's own server (issue 25), the yardstick users would pick.

Both servers run on this machine's cores at once (each idle while the other answers), with the same
threads, and the same client code (bench.clients) drives both: at each N of `serving_users`, N users
send a message at the same moment and wait for its whole streamed reply; `serving_rounds` rounds,
the two servers in turn within each round (a slow phase of the machine hits both).

* ours: `app.py` in one process, as `make run` serves it, through its OpenAI-compatible API with each
  user's API key. Each user has about `serving_history_tokens` of history absorbed into their adapter
  (stored, then compressed through POST /v1/memory/compress: the generator's pass) and 2 recent turns
  not absorbed, sent as the request's earlier messages (the API's recent context) with `store: false`,
  so that every round sees the app's real prompt for that user: its system text, the recent turns,
  the new message, answered on the user's adapter.
* llama-server: the same messages on the same model file, the app's system text as a system message
  (the app adds its own), without the adapter. As it ships: continuous batching over --parallel
  slots, its prompt cache on (a slot keeps the start of the last prompt it served).

Replies: greedy, exactly `serving_reply_tokens` tokens on both sides (ignore_eos). Reported per N and
server: aggregate tokens/s (every reply's tokens over the rounds' wall time), p50/p95 time to first
token and of the whole turn.

`python -m bench` runs it; alone (the other sections' figures left as they are):

  python -m bench.serving --out docs/bench/serving     # serving.json, serving.md, serving.png
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from adapter_core import GenerativeAdapterModel
from adapter_core.base_model import default_gguf_path
from adapter_core.data.conversation import SYSTEM_PROMPT, Turn, history_text
from adapter_core.serving.decoding import count_tokens
from app.openai_api import MODEL_ID
from storage import Storage

from .clients import ApiUser, StreamedReply, at_once, compress_now, streamed_reply
from .decode import LLAMA_CPP, llama_cpp_version, not_built
from .replicas import PASSWORD
from .sections import QUESTION, BenchOptions, history_turns
from .servers import AppFlags, app_env, llama_server, one_process

OURS, LLAMA_SERVER = "ours", "llama-server"
RECENT_TURNS = 2
"""Turns of each user not absorbed yet: the prompt's recent context."""
RECENT_ROOM = 200
"""About the tokens those turns take (a user's conversation is made this much longer than what is absorbed)."""
SLOT_TOKENS = 2048
"""Room of each llama-server slot: a prompt here (system text, 2 turns, a message) and its reply fit in it."""


def serving(engine: GenerativeAdapterModel, cache_dir: Path, flags: AppFlags, options: BenchOptions,
            tools: Path = LLAMA_CPP) -> dict:
    """Both servers' figures; llama-server's rows are left out, with {"llama_server": {"skipped": why}},
    where scripts/build-llama-bench.sh has not built it. {"failed": why} where a server failed (logs kept)."""
    binary = tools / "llama-server"
    built = binary.exists()
    users = _users(engine, max(options.serving_users), options.serving_history_tokens)
    folder = Path(tempfile.mkdtemp(prefix="memchat-bench-serving-"))
    rows = []
    try:
        with ExitStack() as running:
            servers = {OURS: _our_server(running, folder, cache_dir.resolve(), flags, options, users,
                                         engine.tokenizer)}
            if built:
                url = running.enter_context(llama_server(
                    binary, default_gguf_path(), torch.get_num_threads(), max(options.serving_users), SLOT_TOKENS,
                    folder / "llama-server.log"))
                servers[LLAMA_SERVER] = _clients(running, url, ["none"] * len(users),
                                                 [{"role": "system", "content": SYSTEM_PROMPT}])
            for clients in servers.values():  # warm-up, not timed: each server's first reply
                _turn(clients[0], users[0], "Hello!", options.serving_reply_tokens)
            for n in options.serving_users:
                done: dict[str, list] = {name: [] for name in servers}
                wall = dict.fromkeys(servers, 0.0)
                for r in range(options.serving_rounds):
                    for name, clients in servers.items():
                        replies, seconds = at_once(clients[:n], lambda i, client: _turn(
                            client, users[i], f"{QUESTION} (round {r + 1})", options.serving_reply_tokens))
                        done[name] += replies
                        wall[name] += seconds
                rows += [_row(name, n, done[name], wall[name]) for name in servers]
    except Exception as e:  # noqa: BLE001 - the other sections' figures are kept; this one says why
        return {"failed": f"{type(e).__name__}: {e} (logs in {folder})"}
    shutil.rmtree(folder, ignore_errors=True)
    result = {"users": list(options.serving_users), "rounds": options.serving_rounds,
              "reply_tokens": options.serving_reply_tokens, "threads": torch.get_num_threads(),
              "history_tokens_absorbed": round(float(np.mean([u.absorbed_tokens for u in users]))), "rows": rows}
    result["llama_server"] = ({"version": llama_cpp_version(tools), "model": default_gguf_path().name} if built
                              else {"skipped": not_built(binary)})
    return result


class _User:
    """One simulated person: the history absorbed into their adapter, and the recent turns that are not."""

    def __init__(self, absorbed: list[Turn], absorbed_tokens: int, recent: list[Turn]) -> None:
        self.absorbed, self.absorbed_tokens, self.recent = absorbed, absorbed_tokens, recent

    def messages(self, text: str) -> list[dict]:
        return [{"role": t.role, "content": t.text} for t in self.recent] + [{"role": "user", "content": text}]


class _Client:
    """A user's client of one server: the HTTP client, and the messages it puts before the user's own."""

    def __init__(self, user: ApiUser, before: list[dict]) -> None:
        self.user, self.before = user, before


def _users(engine: GenerativeAdapterModel, n: int, history_tokens: int) -> list[_User]:
    """n users, each a conversation of its own: about history_tokens absorbed, then RECENT_TURNS turns
    ending with the assistant's (the new message follows)."""
    users = []
    for u in range(n):
        turns = history_turns(engine.tokenizer, history_tokens + RECENT_ROOM, seed=500 + u)
        if turns[-1].role != "assistant":
            turns = turns[:-1]
        absorbed = turns[:-RECENT_TURNS]
        while (tokens := count_tokens(engine.tokenizer, history_text(absorbed))) > history_tokens:
            absorbed = absorbed[1:]  # the recent turns were short: the oldest turns go
        users.append(_User(absorbed, tokens, turns[-RECENT_TURNS:]))
    return users


def _our_server(running: ExitStack, folder: Path, cache: Path, flags: AppFlags, options: BenchOptions,
                users: list[_User], tokenizer) -> list[_Client]:
    """app.py started, the users' histories stored and compressed into their adapters: a client each."""
    url = running.enter_context(one_process(folder / "app", cache, flags.args(options.serving_reply_tokens), app_env()))
    data = folder / "app" / "data"
    keys = []
    with Storage(f"sqlite:///{data / 'memchat.db'}", data) as storage:  # the app's own database
        for u, user in enumerate(users):
            made = storage.create_user(f"serving{u}", PASSWORD)
            conversation = storage.start_conversation(made.id).id
            for turn in user.absorbed:
                storage.append_message(made.id, conversation, turn.role, turn.text, count_tokens(tokenizer, turn.text))
            keys.append(storage.create_api_key(made.id, "bench").secret)
    compress_now(url, keys)
    return _clients(running, url, keys, [])


def _clients(running: ExitStack, url: str, keys: list[str], before: list[dict]) -> list[_Client]:
    """A client per key of the server at url, closed when `running` ends."""
    clients = [_Client(ApiUser(url, key), before) for key in keys]
    for client in clients:
        running.callback(client.user.close)
    return clients


def _turn(client: _Client, user: _User, text: str, tokens: int) -> StreamedReply:
    """One turn of the user on this client's server: the message after the recent turns, not stored."""
    return streamed_reply(client.user, client.before + user.messages(text), tokens, MODEL_ID,
                          extra={"store": False})


def _row(server: str, users: int, replies: list[StreamedReply], seconds: float) -> dict:
    first, total = [r.first_token_s for r in replies], [r.total_s for r in replies]
    tokens = sum(r.tokens for r in replies)
    return {"server": server, "users": users, "replies": len(replies), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "prompt_tokens_p50": float(np.percentile([r.prompt_tokens for r in replies], 50)),
            "first_token_p50_s": float(np.percentile(first, 50)), "first_token_p95_s": float(np.percentile(first, 95)),
            "turn_p50_s": float(np.percentile(total, 50)), "turn_p95_s": float(np.percentile(total, 95))}


def main(argv: list[str] | None = None) -> dict:
    from .__main__ import engine_of, section_alone
    from .report import plot_serving, serving_markdown

    def measure(args) -> dict:  # the engine's tokenizer makes the histories
        return serving(engine_of(args), args.cache_dir, AppFlags.of(args), BenchOptions())

    return section_alone(__doc__, "serving", measure, plot_serving, serving_markdown, argv)


if __name__ == "__main__":
    main()
