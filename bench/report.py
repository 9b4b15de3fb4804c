"""The benchmark's markdown table and plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from adapter_core.serving.int4 import MAX_ROWS  # noqa: E402


def _by_mode(rows: list[dict], mode: str) -> dict[int, dict]:
    return {r["history_tokens"]: r for r in rows if r["mode"] == mode}


def latency_ratios(results: dict, key: str = "reply_s") -> dict[int, float]:
    """Full-history time over adapter time, per history length."""
    full, adapter = _by_mode(results["per_turn"], "full_history"), _by_mode(results["per_turn"], "adapter")
    return {n: full[n][key] / adapter[n][key] for n in full if n in adapter}


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _decoding(results: dict) -> str:
    layers = results.get("four_bit_layers", 0)
    if not layers:
        return "Decoding on the fp32 weights."
    return (f"Decoding (inputs of at most {MAX_ROWS} rows) on the 4-bit weights of the model file in {layers} linear "
            f"layers, with {results.get('four_bit_activations', 'bf16 activations')} there; prefill, absorption "
            "and the fp32 embedding as they were.")


def markdown(results: dict) -> str:
    t = results["targets"]
    machine = results["machine"]
    where = machine["gpu"] or f"CPU, {machine['cpu_threads']} threads"
    lines = [f"# Benchmark ({where})", "",
             f"Model `{results['model']}`, generator `{results['generator']}` (rank {results['rank']}); "
             f"{'QUICK MODE: sizes too small for the targets to mean anything; ' if results['quick'] else ''}"
             f"whole run {results['seconds']:.0f} s.", "",
             _decoding(results), "",
             "## Cost of one turn", "",
             f"Reply of {results['options']['reply_tokens']} tokens; adapter mode keeps the last "
             f"{results['options']['recent_turns']} turns in the prompt and the rest in the adapter. Peak memory: "
             "on the CPU, how much resident memory grew during the turn (memory that the allocator reuses "
             "from earlier turns is not counted); on CUDA, the allocator's peak.", "",
             "| history tokens | mode | prompt tokens | first token (s) | reply (s) | peak memory (MB) | prefill GFLOPs |",
             "|---|---|---|---|---|---|---|"]
    for r in results["per_turn"]:
        lines.append(f"| {r['history_tokens']} | {r['mode']} | {r['prompt_tokens']} | {r['time_to_first_token_s']:.3f} "
                     f"| {r['reply_s']:.3f} | {r['peak_memory_mb']:.1f} | {r['prefill_gflops']:.1f} |")
    ratios = latency_ratios(results)
    first = latency_ratios(results, "time_to_first_token_s")
    lines += ["", "| history tokens | full-history / adapter: whole reply | : first token |", "|---|---|---|"]
    lines += [f"| {n} | {ratio:.1f}x | {first[n]:.1f}x |" for n, ratio in ratios.items()]
    for n, target in ((2048, t["latency_ratio_2k"]), (8192, t["latency_ratio_8k"])):
        if n in ratios:
            lines.append(f"\nTarget at {n} tokens: adapter <= 1/{target:.0f} of full history: whole reply "
                         f"{ratios[n]:.1f}x, {_verdict(ratios[n] >= target)}; first token {first[n]:.1f}x, "
                         f"{_verdict(first[n] >= target)}.")
    c = results["compression"]
    lines += ["", "## Compression", "",
              f"Absorbing {c['absorb_tokens']} new tokens:", "", "| tokens already absorbed | seconds |", "|---|---|"]
    lines += [f"| {r['absorbed_before']} | {r['absorb_s']:.3f} |" for r in c["rows"]]
    lines += ["", f"- throughput while building memory: {c['tokens_per_s']:.0f} tokens/s",
              f"- spread of the absorb times: {100 * c['spread']:.1f}% (target <= {100 * t['absorb_spread']:.0f}%, "
              f"{_verdict(c['spread'] <= t['absorb_spread'])})",
              f"- generator overhead over a plain forward of the same windows ({c['plain_forward_s']:.3f} s): "
              f"{100 * c['generator_overhead']:.1f}% (target <= {100 * t['generator_overhead']:.0f}%, "
              f"{_verdict(c['generator_overhead'] <= t['generator_overhead'])})",
              "", "## Many users in one batch", "",
              f"Greedy decoding of {results['options']['decode_tokens']} tokens per user, each user with their own adapter.",
              "", "| users | tokens/s without adapters | tokens/s with adapters | overhead |", "|---|---|---|---|"]
    for r in results["many_users"]:
        lines.append(f"| {r['users']} | {r['base_tokens_per_s']:.1f} | {r['adapter_tokens_per_s']:.1f} "
                     f"| {100 * r['adapter_overhead']:.1f}% |")
    last = results["many_users"][-1]
    if last["users"] == 16:
        lines.append(f"\nTarget at 16 users: overhead <= {100 * t['many_users_overhead_16']:.0f}%: "
                     f"{_verdict(last['adapter_overhead'] <= t['many_users_overhead_16'])}.")
    lines += _decode(results)
    lines += _concurrency(results)
    lines += ["", *_long_prefill(results)]
    lines += ["", *finetune_markdown(results)]
    lines += ["", "## Memory per user", "", "| history tokens | adapter state | KV cache of the history | raw text |",
              "|---|---|---|---|"]
    for r in results["memory_size"]:
        lines.append(f"| {r['history_tokens']} | {r['adapter_state_bytes'] / 1e3:.0f} kB | "
                     f"{r['kv_cache_bytes'] / 1e6:.1f} MB | {r['raw_text_bytes'] / 1e3:.1f} kB |")
    state = results["memory_size"][0]["adapter_state_bytes"]
    lines.append(f"\nTarget: state <= 1 MB per user: {state / 1e6:.2f} MB, {_verdict(state <= t['state_bytes'])}.")
    lines += serving_markdown(results)
    lines += replicas_markdown(results)
    lines += ["", "Plots: `per_turn.png`, `many_users.png`, `decode.png`, `concurrent_users.png`, `memory_size.png`"
                  + (", `serving.png`" if "rows" in results.get("serving", {}) else "")
                  + (", `replicas.png`." if "rows" in results.get("replicas", {}) else "."), ""]
    return "\n".join(lines)


def _heading(results: dict, key: str, title: str) -> tuple[dict | None, list[str]]:
    """A section's heading lines and its figures; None for those where it was not run (no lines then)
    or not measured (a line says why)."""
    r = results.get(key)
    if not r:
        return None, []
    lines = ["", f"## {title}", ""]
    if "rows" not in r:
        return None, [*lines, f"Not measured: {r.get('skipped') or r.get('failed')}."]
    return r, lines


def serving_markdown(results: dict) -> list[str]:
    """bench.serving: ours against llama-server per number of users, and the targets."""
    r, lines = _heading(results, "serving", "Serving over HTTP, against llama.cpp's own server")
    if r is None:
        return lines
    lines += [f"N users send a message at the same moment, {r['rounds']} rounds, the two servers in turn; each "
              f"user has about {r['history_tokens_absorbed']} tokens absorbed into their adapter and 2 recent turns "
              f"in the prompt. Greedy replies of exactly {r['reply_tokens']} tokens, streamed, through the same "
              "client code (the OpenAI SDK). *ours*: `app.py` (one process) through its OpenAI-compatible API with "
              "each user's key, answering on the user's adapter; *llama-server*: llama.cpp's server on the same "
              "GGUF, the same prompt text without the adapter, as it ships (continuous batching, prompt cache on), "
              f"{r['threads']} threads each.", "",
              "| users | server | tokens/s | first token p50 (s) | p95 (s) | whole turn p50 (s) | p95 (s) | prompt tokens |",
              "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['users']} | {row['server']} | {row['tokens_per_s']:.1f} | {row['first_token_p50_s']:.2f} "
                     f"| {row['first_token_p95_s']:.2f} | {row['turn_p50_s']:.2f} | {row['turn_p95_s']:.2f} "
                     f"| {row['prompt_tokens_p50']:.0f} |")
    if "skipped" in r["llama_server"]:
        return [*lines, "", f"llama-server not measured: {r['llama_server']['skipped']}."]
    t, by = results["targets"], {(row["server"], row["users"]): row for row in r["rows"]}
    checks = []
    if ("ours", 16) in by:
        ours, theirs = by["ours", 16], by["llama-server", 16]
        speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
        first = ours["first_token_p95_s"] / theirs["first_token_p95_s"]
        checks += [f"16 users, tokens/s >= {t['serving_tokens_per_s_16']:.1f}x llama-server's: {speed:.2f}x, "
                   f"{_verdict(speed >= t['serving_tokens_per_s_16'])}",
                   f"16 users, p95 first token <= {t['serving_first_token_p95_16']:.1f}x llama-server's: {first:.2f}x, "
                   f"{_verdict(first <= t['serving_first_token_p95_16'])}"]
    if ("ours", 1) in by:
        turn = by["ours", 1]["turn_p50_s"] / by["llama-server", 1]["turn_p50_s"]
        checks.append(f"1 user, whole turn <= {t['serving_turn_p50_1']:.1f}x llama-server's: {turn:.2f}x, "
                      f"{_verdict(turn <= t['serving_turn_p50_1'])}")
    return [*lines, "", f"llama-server: {r['llama_server']['version']}, {r['llama_server']['model']}. Targets, this "
                        "run: " + "; ".join(checks) + "."]


def replicas_markdown(results: dict) -> list[str]:
    """bench.replicas: the setups' table, 1 against 2 replicas, and the cost of the shared state."""
    r, lines = _heading(results, "replicas", "Many users through the load balancer")
    if r is None:
        return lines
    lines += [f"{r['users']} users at once, each with their own API key and adapter (built from a first message, "
              f"not timed), each sending {r['rounds']} messages, one after the reply to the one before, through the "
              f"OpenAI-compatible API; streamed greedy replies of exactly {r['reply_tokens']} tokens. *one process*: "
              "`app.py` on SQLite, limits in the process, adapter snapshots in files, no load balancer (run before "
              "and after the cluster: their spread is this machine's noise); *cluster*: `scripts/cluster.sh` "
              "(PostgreSQL, Redis, adapter snapshots in the database, two idle compression workers, HAProxy in "
              "front), every process on this one machine's cores.", "",
              "| setup | replies | tokens/s | first token p50 (s) | p95 (s) | whole reply p50 (s) | p95 (s) | replicas |",
              "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['setup']} | {row['replies']} | {row['tokens_per_s']:.1f} | {row['first_token_p50_s']:.2f} "
                     f"| {row['first_token_p95_s']:.2f} | {row['reply_p50_s']:.2f} | {row['reply_p95_s']:.2f} "
                     f"| {', '.join(row['replicas_seen'])} |")
    by = {row["setup"]: row for row in r["rows"]}
    two, one = by.get("cluster, 2 web replicas"), by.get("cluster, 1 web replica")
    if two and one:
        lines += ["", f"2 web replicas against 1: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x the tokens/s "
                      f"(the same two cores serve both: no speedup is expected here)."]
    cost, target = r["shared_state_cost_p50"], results["targets"]["replicas_shared_state_cost_p50"]
    alone = ", ".join(f"{row['setup']} {row['alone_reply_p50_s']:.2f} s" for row in r["rows"])
    spread = r.get("one_process_spread_p50")
    noise = f" (the second one-process run over the first, the same way: {100 * spread:+.1f}%)" if spread is not None else ""
    lines += ["", f"Then one user alone, {r['alone_replies']} messages one after another (whole reply p50: {alone}). "
                  f"What the shared state and the load balancer cost per reply, the median over those replies of the "
                  f"cluster's one replica's over the one process's same reply: {100 * cost:+.1f}%{noise} (target <= "
                  f"{100 * target:.0f}%, {_verdict(cost <= target)}); with all {r['users']} users at once, p50 over p50: "
                  f"{100 * r['shared_state_cost_p50_all_at_once']:+.1f}%. It includes PostgreSQL, Redis, HAProxy and the "
                  "idle workers sharing the cores."]
    return lines


def _decode(results: dict) -> list[str]:
    d, t = results["decode"], results["targets"]
    llama = d["llama_cpp"]
    lines = ["", "## Decode speed beside llama.cpp", "",
             f"Greedy decoding of {results['options']['decode_bench_tokens']} tokens per user after a short prompt "
             f"(prefill not counted), {d['threads']} threads, each user with their own adapter (one user: the folded "
             "LoRA pair). The lean step (adapter_core/serving/lean_decoder.py) against the transformers path it replaced, and "
             "llama.cpp on the same GGUF: `llama-bench` (tg) for one sequence, `llama-batched-bench` (text generation) "
             "for parallel ones" + (f", built from {llama['version']}." if llama.get("version") else "."), ""]
    if "skipped" in llama:
        lines += [f"llama.cpp: skipped: {llama['skipped']}", ""]
    lines += ["| users | lean step (tokens/s) | transformers path | llama.cpp | lean / llama.cpp |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        theirs = f"{r['llama_cpp']:.1f}" if r["llama_cpp"] else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        lines.append(f"| {r['users']} | {r['lean']:.1f} | {r['transformers']:.1f} | {theirs} | {ratio} |")
    one = d["rows"][0]
    if one["users"] == 1 and one["ratio"]:
        lines.append(f"\nTarget: one user >= {t['decode_vs_llama_cpp_1']:.1f}x llama.cpp: {one['ratio']:.2f}x, "
                     f"{_verdict(one['ratio'] >= t['decode_vs_llama_cpp_1'])}.")
    if d.get("prefill"):
        lines += ["", "Prefill (one prompt, no adapter; llama.cpp: `llama-bench` ppN):", "",
                  "| prompt tokens | ours (tokens/s) | llama.cpp | ours / llama.cpp |", "|---|---|---|---|"]
        for r in d["prefill"]:
            theirs = f"{r['llama_cpp']:.1f}" if r["llama_cpp"] else "-"
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
            lines.append(f"| {r['tokens']} | {r['ours']:.1f} | {theirs} | {ratio} |")
        ratios = [r["ratio"] for r in d["prefill"] if r["ratio"]]
        if ratios:
            lines.append(f"\nTarget: prefill >= {t['prefill_vs_llama_cpp']:.1f}x llama.cpp at every length: worst "
                         f"{min(ratios):.2f}x, {_verdict(min(ratios) >= t['prefill_vs_llama_cpp'])}.")
    a = d["agreement"]
    lines += ["", f"Same answers: over {a['tokens']} tokens of greedy replies (with adapters) read by both paths, the "
              f"lean step picks the transformers path's token at {100 * a['same_greedy_token']:.1f}% of positions "
              f"(target >= {100 * t['same_greedy_token']:.0f}%, {_verdict(a['same_greedy_token'] >= t['same_greedy_token'])}); "
              f"perplexity {a['perplexity']['lean']:.3f} vs {a['perplexity']['transformers']:.3f}, "
              f"{100 * (a['perplexity_ratio'] - 1):+.2f}% (target within {100 * (t['perplexity_ratio'] - 1):.0f}%, "
              f"{_verdict(abs(a['perplexity_ratio'] - 1) <= t['perplexity_ratio'] - 1)})."]
    return lines


def _concurrency(results: dict) -> list[str]:
    c, t = results["concurrent_users"], results["targets"]
    lines = ["", "## Concurrent users", "",
             f"Users send a message at the same moment through the app's services (storage, chat, memory); each has "
             f"about {c['history_tokens']} tokens of history in the adapter; replies of {c['reply_tokens']} tokens, "
             "sampled as in the app (the end of turn held back, so both modes decode as much). *serialized*: one "
             "reply at a time, and a compression runs to its end before anything else (as when every engine call "
             "held one lock); *scheduler*: the inference loop (adapter_core.serving.scheduler), replies in one running "
             "batch, a compression stepping aside between layers when a reply waits.", "",
             "| mode | users | tokens/s | first token p50 (s) | p95 (s) | whole reply p50 (s) | p95 (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        lines.append(f"| {r['mode']} | {r['users']} | {r['tokens_per_s']:.1f} | {r['first_token_p50_s']:.2f} | "
                     f"{r['first_token_p95_s']:.2f} | {r['reply_p50_s']:.2f} | {r['reply_p95_s']:.2f} |")
    by = {(r["mode"], r["users"]): r for r in c["rows"]}
    if ("scheduler", 16) in by and ("serialized", 16) in by:
        speedup = by["scheduler", 16]["tokens_per_s"] / by["serialized", 16]["tokens_per_s"]
        p95 = by["scheduler", 16]["first_token_p95_s"]
        lines += ["", f"At 16 users the loop gives {speedup:.1f}x the serialized path's tokens/s (the yardstick is "
                      "llama-server: see the serving section). Target: p95 first token <= "
                      f"{t['concurrent_first_token_p95_16_s']:.0f} s: {p95:.2f} s, "
                      f"{_verdict(p95 <= t['concurrent_first_token_p95_16_s'])}."]
    lines += ["", "First token of replies sent one after another while a compression runs:", "",
              "| mode | compression tokens | compression (s) | replies | first token, each (s) | worst (s) |",
              "|---|---|---|---|---|---|"]
    for d in c["during_compression"]:
        each = ", ".join(f"{s:.2f}" for s in d["first_token_s"])
        lines.append(f"| {d['mode']} | {d['compression_tokens']} | {d['compression_s']:.1f} | {len(d['first_token_s'])} "
                     f"| {each} | {d['first_token_max_s']:.2f} |")
    for d in c["during_compression"]:
        if d["mode"] == "scheduler":
            limit = t["first_token_during_compression_s"]
            lines += ["", f"Target: during a {d['compression_tokens']}-token compression a new reply's first token "
                          f"within {limit:.0f} s: worst {d['first_token_max_s']:.2f} s, "
                          f"{_verdict(d['first_token_max_s'] <= limit)}."]
    return lines


def _long_prefill(results: dict) -> list[str]:
    d, t = results.get("long_prefill"), results["targets"]
    if not d:
        return []
    each = ", ".join(f"{s:.2f}" for s in d["first_token_s"]) or "none"
    worst = d["first_token_max_s"]
    limit = t["first_token_during_long_prefill_s"]
    return ["## A long prompt beside short ones", "",
            f"User A sends a {d['long_prompt_tokens']:,}-token prompt; while it is prefilled (in chunks, stepping "
            f"aside between decoder layers), user B sends {d['short_prompt_tokens']}-token messages one after another.",
            "", f"B's first tokens (s): {each}. A's first token after {d['long_first_token_s']:.1f} s.", "",
            f"Target: B's first token within {limit:.0f} s: worst "
            + (f"{worst:.2f} s, {_verdict(worst <= limit)}." if worst is not None else "no reply of B measured.")]


def finetune_markdown(results: dict) -> list[str]:
    f, t = results.get("finetune"), results["targets"]
    if not f:
        return []
    lines = ["## The fine-tuning compressor", "",
             f"A LoRA pair per user (rank {f['config']['rank']}, {f['config']['steps']} AdamW steps, windows of "
             f"{f['config']['window_tokens']} tokens, replay of {f['config']['replay_tokens']}).", "",
             "| new tokens, from an empty adapter | seconds |", "|---|---|"]
    lines += [f"| {a['tokens']:,} | {a['seconds']:.1f} |" for a in f["absorb"]]
    lines += ["", "One user's compressions in turn (new turns plus a replay of earlier ones):", "",
              "| compression | history tokens | seconds |", "|---|---|---|"]
    lines += [f"| {c['compression']} | {c['history_tokens']:,} | {c['seconds']:.1f} |" for c in f["compressions"]]
    recall = f.get("recall") or {}
    if recall:
        lines += ["", "A fact told in the first compression (\"my cat is called Tobrik\"), asked alone with no history "
                      "in the prompt: the gold answer's NLL, and the greedy answer:", "",
                  "| adapter | answer NLL | greedy answer |", "|---|---|---|"]
        lines += [f"| {when} | {r['nll']:.2f} | {' '.join(r['answer'][:80].split()).replace('|', '/')} |"
                  for when, r in recall.items()]  # one line in the table, whatever the answer's newlines
    two_k = next((a["seconds"] for a in f["absorb"] if a["tokens"] >= 1900), None)
    d = f["during"]
    if two_k is not None:
        lines += ["", f"Target: 2K new tokens in <= {t['finetune_2k_s']:.0f} s: {two_k:.1f} s, "
                      f"{_verdict(two_k <= t['finetune_2k_s'])}."]
    if d.get("first_token_max_s") is not None:
        lines += [f"First tokens while one runs ({d['compression_s']} s): "
                  + ", ".join(f"{x:.2f}" for x in d["first_token_s"])
                  + f" s; target <= {t['first_token_during_finetune_s']:.0f} s: "
                  + f"{_verdict(d['first_token_max_s'] <= t['first_token_during_finetune_s'])}."]
    return lines


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _lines(ax, xs: list, series: dict[str, list], **axes) -> None:
    for name, ys in series.items():
        ax.plot(xs, ys, "o-", label=name)
    ax.set(**axes)
    ax.legend()


def plot_all(results: dict, folder: Path) -> None:
    full, adapter = _by_mode(results["per_turn"], "full_history"), _by_mode(results["per_turn"], "adapter")
    lengths = sorted(set(full) & set(adapter))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, (("reply_s", "reply time (s)"), ("time_to_first_token_s", "first token (s)"),
                                       ("prefill_gflops", "prefill GFLOPs"))):
        _lines(ax, lengths, {"full history": [full[n][key] for n in lengths],
                             "adapter + recent turns": [adapter[n][key] for n in lengths]},
               xlabel="history tokens", ylabel=label, title=label)
    _save(fig, folder / "per_turn.png")

    rows = results["many_users"]
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, [r["users"] for r in rows], {"no adapters": [r["base_tokens_per_s"] for r in rows],
                                            "one adapter per user": [r["adapter_tokens_per_s"] for r in rows]},
           xlabel="users in the batch", ylabel="decoded tokens/s", title="many users, one batch")
    _save(fig, folder / "many_users.png")

    rows = results["decode"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {"lean step": [r["lean"] for r in rows], "transformers path": [r["transformers"] for r in rows]}
    if all(r["llama_cpp"] for r in rows):
        series["llama.cpp"] = [r["llama_cpp"] for r in rows]
    _lines(ax, [r["users"] for r in rows], series, xlabel="users in the batch", ylabel="decoded tokens/s",
           title="decode speed, same model file", xticks=[r["users"] for r in rows])
    _save(fig, folder / "decode.png")

    fig, axes = _per_users(results["concurrent_users"]["rows"], "mode", (
        ("tokens_per_s", "tokens/s, all users together"), ("first_token_p95_s", "first token, p95 (s)"),
        ("reply_p95_s", "whole reply, p95 (s)")))
    axes[1].axhline(results["targets"]["concurrent_first_token_p95_16_s"], color="grey", linestyle=":",
                    label="target at 16 users")
    axes[1].legend()
    _save(fig, folder / "concurrent_users.png")

    plot_serving(results, folder)
    plot_replicas(results, folder)

    rows = results["memory_size"]
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, [r["history_tokens"] for r in rows],
           {name: [r[key] / 1e6 for r in rows] for key, name in (("kv_cache_bytes", "KV cache"),
                                                                 ("raw_text_bytes", "raw text"),
                                                                 ("adapter_state_bytes", "adapter state"))},
           xlabel="history tokens", ylabel="MB per user", yscale="log", title="memory per user")
    _save(fig, folder / "memory_size.png")


def _per_users(rows: list[dict], series: str, panels: tuple[tuple[str, str], ...]):
    """A figure with a panel per (key, label) of `panels`: a line per value of rows' `series` field
    (a mode, a server) against the number of users sending at once. The figure and its axes."""
    names = list(dict.fromkeys(row[series] for row in rows))
    users = sorted({row["users"] for row in rows})
    by = {(row[series], row["users"]): row for row in rows}
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for ax, (key, label) in zip(axes, panels):
        _lines(ax, users, {name: [by[name, n][key] for n in users] for name in names},
               xlabel="users sending at once", ylabel=label, title=label, xticks=users)
    return fig, axes


def plot_serving(results: dict, folder: Path) -> None:
    """serving.png: ours against llama-server per number of users (nothing where it was not measured)."""
    if "rows" not in results.get("serving", {}):
        return
    fig, _ = _per_users(results["serving"]["rows"], "server", (
        ("tokens_per_s", "tokens/s, all users together"), ("first_token_p95_s", "first token, p95 (s)"),
        ("turn_p50_s", "whole turn, p50 (s)")))
    _save(fig, folder / "serving.png")


def plot_replicas(results: dict, folder: Path) -> None:
    """replicas.png: bench.replicas's setups side by side (nothing where it was not measured)."""
    if "rows" not in results.get("replicas", {}):
        return
    rows = results["replicas"]["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = [f"{row['setup']}\n(run {i + 1})".replace(", ", ",\n") for i, row in enumerate(rows)]
    for ax, (key, label) in zip(axes, (("tokens_per_s", "tokens/s, all users together"),
                                       ("first_token_p50_s", "first token, p50 (s)"),
                                       ("reply_p50_s", "whole reply, p50 (s)"))):
        ax.bar(names, [row[key] for row in rows])
        ax.set(ylabel=label, title=label)
        ax.tick_params(axis="x", labelsize=7)
    _save(fig, folder / "replicas.png")
