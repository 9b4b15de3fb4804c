"""The decode section's measurements: llama.cpp's figures read from its tools, the lean step's agreement."""

import json
import stat

import pytest
import torch

from adapter_core.engine import load_engine
from bench.decode import agreement, llama_cpp_speeds


def test_without_llama_cpp_built_the_comparison_says_how_to_build_it(tmp_path):
    result = llama_cpp_speeds((1, 4), 128, 2, tools=tmp_path)
    assert "build-llama-bench.sh" in result["skipped"]


def test_llama_cpp_figures_are_read_from_its_own_tools(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.decode.default_gguf_path", lambda: tmp_path / "model.gguf")
    outputs = {"llama-bench": json.dumps([{"n_prompt": 0, "n_gen": 128, "avg_ts": 150.5},
                                          {"n_prompt": 512, "n_gen": 0, "avg_ts": 210.0},
                                          {"n_prompt": 2048, "n_gen": 0, "avg_ts": 155.0}]),
               "llama-batched-bench": "main: n_kv_max = 1\n" + "\n".join(
                   json.dumps({"pl": n, "speed_tg": 100.0 * n}) for n in (4, 16))}
    for name, output in outputs.items():  # stand-ins that print what the real tools print
        (tmp_path / f"{name}.out").write_text(output + "\n")
        tool = tmp_path / name
        tool.write_text(f"#!/bin/sh\ncat '{tmp_path / name}.out'\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    result = llama_cpp_speeds((1, 4, 16), 128, 2, (512, 2048), tools=tmp_path)
    assert result["tokens_per_s"] == {1: 150.5, 4: 400.0, 16: 1600.0}
    assert result["prefill_tokens_per_s"] == {512: 210.0, 2048: 155.0}


@pytest.mark.integration
def test_the_lean_step_answers_as_the_transformers_path_on_the_real_model(model_cache):
    engine = load_engine(cache_dir=model_cache, use_shipped=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters that act (an untrained generator's B is zero)
        for layer in engine.adapted.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.02)
    result = agreement(engine, 24)
    assert result["tokens"] == 8 * 24
    assert result["same_greedy_token"] >= 0.95
    assert abs(result["perplexity_ratio"] - 1) <= 0.01
