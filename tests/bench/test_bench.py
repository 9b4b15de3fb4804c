import json
import math
import os

import pytest

from bench.__main__ import main


@pytest.mark.integration
def test_quick_benchmark_runs_and_writes_every_section(model_cache, tmp_path):
    main(["--quick", "--out", str(tmp_path), "--cache-dir", str(model_cache)])
    results = json.loads((tmp_path / "bench.json").read_text())
    for name in ("bench.md", "per_turn.png", "many_users.png", "decode.png", "concurrent_users.png", "memory_size.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = results["per_turn"]
    assert {(r["history_tokens"], r["mode"]) for r in rows} == {(n, m) for n in (256, 512)
                                                                 for m in ("full_history", "adapter")}
    for r in rows:
        assert r["reply_s"] >= r["time_to_first_token_s"] > 0 and math.isfinite(r["prefill_gflops"])
    by = {(r["history_tokens"], r["mode"]): r for r in rows}
    # structure, not timing: the full-history prompt grows with history, the adapter prompt does not
    assert by[512, "full_history"]["prefill_gflops"] > by[256, "full_history"]["prefill_gflops"] > by[256, "adapter"]["prefill_gflops"]
    assert by[512, "adapter"]["prompt_tokens"] == pytest.approx(by[256, "adapter"]["prompt_tokens"], abs=20)
    assert len(results["compression"]["rows"]) == 2 and results["compression"]["tokens_per_s"] > 0
    assert [r["users"] for r in results["many_users"]] == [1, 2]
    decode = results["decode"]
    assert [r["users"] for r in decode["rows"]] == [1, 2]
    assert all(r["lean"] > 0 and r["transformers"] > 0 for r in decode["rows"])
    assert "skipped" in decode["llama_cpp"] or decode["llama_cpp"]["tokens_per_s"]["1"] > 0  # JSON keys
    assert [r["tokens"] for r in decode["prefill"]] == [64] and decode["prefill"][0]["ours"] > 0
    assert decode["agreement"]["tokens"] == 8 * 8 and 0 <= decode["agreement"]["same_greedy_token"] <= 1
    concurrent = results["concurrent_users"]
    assert [(r["mode"], r["users"]) for r in concurrent["rows"]] == [(m, n) for m in ("serialized", "scheduler")
                                                                     for n in (1, 2)]
    for r in concurrent["rows"]:
        assert r["tokens"] > 0 and r["reply_p95_s"] >= r["first_token_p95_s"] > 0
    assert [d["mode"] for d in concurrent["during_compression"]] == ["serialized", "scheduler"]
    assert all(d["first_token_s"] and d["compression_s"] > 0 for d in concurrent["during_compression"])
    long = results["long_prefill"]
    assert 300 < long["long_prompt_tokens"] <= 600 and long["long_first_token_s"] > 0
    assert all(f > 0 for f in long["first_token_s"])
    finetune = results["finetune"]
    assert [a["tokens"] > 0 and a["seconds"] > 0 for a in finetune["absorb"]] == [True]
    assert [c["compression"] for c in finetune["compressions"]] == [1, 2]
    assert set(finetune["recall"]) == {"base", "after 1"} and finetune["recall"]["base"]["nll"] > 0
    assert finetune["during"]["compression_s"] > 0
    sizes = results["memory_size"]
    assert sizes[0]["adapter_state_bytes"] == sizes[1]["adapter_state_bytes"] < 1_000_000
    assert sizes[1]["kv_cache_bytes"] > sizes[0]["kv_cache_bytes"]
    served = results["serving"]  # llama-server's rows where scripts/build-llama-bench.sh built it
    assert "rows" in served, served.get("failed")
    assert [r["users"] for r in served["rows"] if r["server"] == "ours"] == [1, 2]
    assert all(r["tokens"] == r["replies"] * 4 for r in served["rows"])
    cluster = results["replicas"]
    if "skipped" in cluster:  # only where the cluster's programs are missing and cannot be installed
        assert os.geteuid() != 0 and os.environ.get("CI") != "true", cluster["skipped"]
    else:
        assert "rows" in cluster, cluster.get("failed")
        rows = cluster["rows"]
        assert [(r["setup"], r["replicas_seen"]) for r in rows] == [
            ("one process", ["direct"]), ("cluster, 2 web replicas", ["web1", "web2"]),
            ("cluster, 1 web replica", ["web1"]), ("one process", ["direct"])]
        for r in rows:  # every reply as long as asked, on the user's adapter, to the same prompts everywhere
            assert (r["replies"], r["tokens"], r["adapter_versions_seen"]) == (3, 3 * 4, ["1"])
            assert r["prompt_tokens"] == rows[0]["prompt_tokens"] > 0
            assert r["reply_p95_s"] >= r["reply_p50_s"] >= r["first_token_p50_s"] > 0 and r["alone_reply_p50_s"] > 0
            assert len(r["alone_reply_s"]) == 3 and min(r["alone_reply_s"]) > 0
            assert r["alone_prompt_tokens"] == rows[0]["alone_prompt_tokens"]  # compared in pairs across setups
        assert math.isfinite(cluster["shared_state_cost_p50"] + cluster["shared_state_cost_p50_all_at_once"]
                             + cluster["one_process_spread_p50"])
        assert (tmp_path / "replicas.png").stat().st_size > 0
        assert "Many users through the load balancer" in (tmp_path / "bench.md").read_text()
