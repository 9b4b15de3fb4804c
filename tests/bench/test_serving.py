"""bench.serving: the app and llama-server driven by the same client, on the same workload."""

import json
import stat
import sys
from pathlib import Path

import pytest

from adapter_core.data.conversation import SYSTEM_PROMPT
from adapter_core.engine import load_engine
from bench.report import serving_markdown
from bench.sections import BenchOptions
from bench.servers import AppFlags
from bench.serving import serving

STAND_IN = Path(__file__).with_name("stand_in_llama_server.py")
TARGETS = {"serving_tokens_per_s_16": 1.0, "serving_first_token_p95_16": 1.0, "serving_turn_p50_1": 1.1}


@pytest.mark.integration
def test_both_servers_get_the_same_messages_and_every_reply_is_as_long_as_asked(model_cache, tmp_path, monkeypatch):
    tools = tmp_path / "bin"
    tools.mkdir()
    server = tools / "llama-server"  # the stand-in, started with llama-server's command line
    server.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{STAND_IN}' \"$@\"\n")
    server.chmod(server.stat().st_mode | stat.S_IEXEC)
    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("STAND_IN_REQUESTS", str(requests))
    monkeypatch.setattr("bench.serving.default_gguf_path", lambda: tmp_path / "model.gguf")
    engine = load_engine(cache_dir=model_cache, use_shipped=False)
    options = BenchOptions(serving_users=(1, 2), serving_rounds=2, serving_reply_tokens=3, serving_history_tokens=300)

    result = serving(engine, model_cache, AppFlags("cpu"), options, tools=tools)

    assert "rows" in result, result.get("failed")
    assert [(r["server"], r["users"]) for r in result["rows"]] == [
        ("ours", 1), ("llama-server", 1), ("ours", 2), ("llama-server", 2)]
    for row in result["rows"]:  # every round's replies, each exactly as long as asked
        assert (row["replies"], row["tokens"]) == (2 * row["users"], 2 * row["users"] * 3)
        assert row["turn_p95_s"] >= row["turn_p50_s"] >= row["first_token_p50_s"] > 0
    ours = [r for r in result["rows"] if r["server"] == "ours"]
    assert all(r["prompt_tokens_p50"] > 50 for r in ours)  # system text, 2 recent turns, the message
    assert 200 <= result["history_tokens_absorbed"] <= 300
    sent = [json.loads(line) for line in requests.read_text().splitlines()]
    assert len(sent) == 1 + 2 * (1 + 2)  # the warm-up, then two rounds of 1 and of 2 users
    for body in sent:  # the app's system text, the user's recent turns, the message; as long as asked
        assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert [m["role"] for m in body["messages"][1:]] == ["user", "assistant", "user"]
        assert (body["ignore_eos"], body["max_tokens"], body["temperature"], body["stream"]) == (True, 3, 0, True)
    lines = "\n".join(serving_markdown({"serving": result, "targets": TARGETS}))
    assert "| 2 | llama-server |" in lines and "1 user, whole turn <= 1.1x llama-server's" in lines


def test_without_llama_server_built_the_report_says_how_to_build_it():
    result = {"users": [1], "rounds": 1, "reply_tokens": 4, "threads": 2, "history_tokens_absorbed": 256,
              "rows": [{"server": "ours", "users": 1, "replies": 1, "tokens": 4, "seconds": 1.0, "tokens_per_s": 4.0,
                        "prompt_tokens_p50": 90.0, "first_token_p50_s": 0.5, "first_token_p95_s": 0.5,
                        "turn_p50_s": 1.0, "turn_p95_s": 1.0}],
              "llama_server": {"skipped": "data/llama.cpp/bin/llama-server not found: build it with "
                                          "`bash scripts/build-llama-bench.sh`"}}
    lines = "\n".join(serving_markdown({"serving": result, "targets": TARGETS}))
    assert "| 1 | ours | 4.0 |" in lines and "build-llama-bench.sh" in lines
