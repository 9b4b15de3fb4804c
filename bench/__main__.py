"""`python -m bench`: per-turn cost, compression, many users in one batch, decode speed beside
llama.cpp's, concurrent users through the app's services, memory size, and many users through the
load balancer of a cluster (processes of their own), on one machine in one run. Writes bench.json,
bench.md and PNG plots to --out (default docs/bench/).

  python -m bench                 # the full benchmark on the CPU (about 25 minutes on 2 cores, 16 of
                                  # them the replicas section's processes)
  python -m bench --device cuda
  python -m bench --quick --out /tmp/bench   # a small run that checks everything works
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from adapter_core.engine import load_engine
from adapter_core.serving.int4 import activations, four_bit_layers

from .concurrency import concurrent_users, during_long_prefill
from .decode import decode
from .finetune import finetune_compression
from .replicas import replicas
from .report import markdown, plot_all
from .sections import BenchOptions, compression, many_users, memory_size, per_turn
from .servers import AppFlags
from .serving import serving

QUICK = BenchOptions(lengths=(256, 512), reply_tokens=4, repeats=1, absorbed_before=(0, 512), absorb_tokens=256,
                     users=(1, 2), decode_tokens=4, concurrent_users=(1, 2), concurrent_reply_tokens=4,
                     concurrent_history_tokens=256, compression_tokens=512, replies_during_compression=2,
                     decode_bench_tokens=8, prefill_lengths=(64,), agreement_tokens=8, long_prompt_tokens=600,
                     finetune_tokens=(128,), compressions=2, replicas_users=3, replicas_rounds=1,
                     replicas_reply_tokens=4, replicas_alone_replies=3,
                     serving_users=(1, 2), serving_rounds=1, serving_reply_tokens=4, serving_history_tokens=256)
TARGETS = {
    "latency_ratio_2k": 4.0, "latency_ratio_8k": 20.0, "absorb_spread": 0.20, "generator_overhead": 0.50,
    "many_users_overhead_16": 0.25, "state_bytes": 1_000_000,
    "concurrent_first_token_p95_16_s": 3.0, "first_token_during_compression_s": 1.0,
    "first_token_during_long_prefill_s": 1.0,
    "finetune_2k_s": 60.0, "first_token_during_finetune_s": 1.0,
    "decode_vs_llama_cpp_1": 0.8, "prefill_vs_llama_cpp": 1.0, "same_greedy_token": 0.95, "perplexity_ratio": 1.01,
    "replicas_shared_state_cost_p50": 0.05,
    # against llama-server, same run (bench.serving): ours over theirs
    "serving_tokens_per_s_16": 1.0, "serving_first_token_p95_16": 1.0, "serving_turn_p50_1": 1.1,
}


def model_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line of `python -m bench` and of a section run alone: what the model runs on."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--model", default=None, help="base model id or path (default: embedded SmolLM2-135M)")
    p.add_argument("--checkpoint", default=None, help="generator folder (default: the shipped one)")
    p.add_argument("--cache-dir", type=Path, default=Path("data/model-cache"))
    p.add_argument("--int4-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, decode on the model's 4-bit weights, as the app does (default: on)")
    return p


def engine_of(args: argparse.Namespace):
    """The engine model_arguments' flags ask for, in eval mode."""
    engine = load_engine(args.model, args.checkpoint, device=args.device, cache_dir=args.cache_dir,
                         int4_decode=None if args.int4_decode else False)
    engine.eval()
    return engine


def machine(device: torch.device | str) -> dict:
    """What ran a benchmark: figures from two machines of one kind still differ (AVX2 or AVX-512)."""
    device = torch.device(device)
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    named = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines) if value}
    flags = f" {named.get('flags', '')} "
    return {"device": str(device), "cpu": named.get("model name") or platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "avx512": " avx512f" in flags,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "platform": platform.platform(), "torch": torch.__version__}


def log_progress() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of bench.replicas


def section_alone(doc: str, name: str, measure, plot, lines, argv: list[str] | None) -> dict:
    """`python -m bench.<name>`: one section run alone, the other sections' figures left as they are;
    measure(args) its figures, written with plot(results, folder) and lines(results) to --out
    (default docs/bench/<name>/: <name>.json, <name>.md, the plot)."""
    p = model_arguments(doc)
    p.add_argument("--out", type=Path, default=Path("docs/bench") / name)
    args = p.parse_args(argv)
    log_progress()
    started = time.perf_counter()
    results = {"machine": machine(args.device), "targets": TARGETS, name: measure(args)}
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out)
    (args.out / f"{name}.md").write_text("\n".join(lines(results)).strip() + "\n")
    print((args.out / f"{name}.md").read_text())
    return results


def main(argv: list[str] | None = None) -> dict:
    p = model_arguments(__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it works, not the timings")
    args = p.parse_args(argv)
    log_progress()
    options = QUICK if args.quick else BenchOptions()
    started = time.perf_counter()
    engine = engine_of(args)
    results = {
        "machine": machine(engine.device),
        "model": engine.base_model_id, "four_bit_layers": four_bit_layers(engine.base_model),
        "four_bit_activations": activations(),
        "generator": engine.generator_id, "rank": engine.config.rank,
        "quick": args.quick, "options": options.__dict__, "targets": TARGETS,
    }
    for name, section in (("per_turn", per_turn), ("compression", compression), ("many_users", many_users),
                          ("decode", decode), ("concurrent_users", concurrent_users), ("long_prefill", during_long_prefill),
                          ("finetune", finetune_compression),
                          ("memory_size", memory_size)):
        t = time.perf_counter()
        logging.info("benchmark section %s ...", name)
        results[name] = section(engine, options)
        logging.info("... %s took %.0f s", name, time.perf_counter() - t)
    t = time.perf_counter()
    logging.info("benchmark section serving (the app and llama-server over HTTP) ...")
    results["serving"] = serving(engine, args.cache_dir, AppFlags.of(args), options)
    logging.info("... serving took %.0f s", time.perf_counter() - t)
    t = time.perf_counter()
    logging.info("benchmark section replicas (app processes of their own) ...")
    results["replicas"] = replicas(args.cache_dir, AppFlags.of(args), options)
    logging.info("... replicas took %.0f s", time.perf_counter() - t)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    plot_all(results, args.out)
    (args.out / "bench.md").write_text(markdown(results))
    print((args.out / "bench.md").read_text())
    return results


if __name__ == "__main__":
    main()
