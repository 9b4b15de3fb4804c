"""A one-minute check of the training and answering code on the device, with a tiny random model
(no GGUF needed), so that a broken environment is found before the minutes of a real run are
spent. Run it in the first call: python3 scripts/device/check.py (after installing .whl, see
docs/gpu-training.md). On a machine without CUDA it checks the CPU path instead.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from adapter_core import GenerativeAdapterModel, GeneratorConfig  # noqa: E402
from adapter_core.base_model import pick_dtype  # noqa: E402
from adapter_core.serving.decoding import ReplyRequest, reply  # noqa: E402
from adapter_core.serving.sampling import SamplingConfig  # noqa: E402
from adapter_core.training.objectives import DataRecipe  # noqa: E402
from adapter_core.training.trainer import Trainer, TrainConfig  # noqa: E402
from tests.conftest import byte_tokenizer, tiny_text_lm  # noqa: E402


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(device)
    print(f"torch {torch.__version__}, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'no GPU'}), base dtype {dtype}")
    tok = byte_tokenizer()
    base = tiny_text_lm(tok).to(device=device, dtype=dtype).requires_grad_(False)
    engine = GenerativeAdapterModel(base, GeneratorConfig(rank=8, window=64), "tiny-text", tok)

    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(output_dir=folder, data=DataRecipe(batch_size=4, qa_facts=(1, 2), qa_lengths=(60, 120)),
                             learning_rate=1e-2, warmup_steps=1, max_steps=12, eval_every=6, eval_questions=4,
                             save_every=6, device=str(device))
        started = time.perf_counter()
        done = Trainer(config, engine).train(show_progress=False)
        losses = [e["loss"] for e in done.log if "loss" in e]
        print(f"trained {done.step} steps in {time.perf_counter() - started:.1f} s, "
              f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, saved: {sorted(p.name for p in Path(folder).iterdir())}")
        assert all(torch.isfinite(torch.tensor(losses))), losses

    engine.eval()
    alice = engine.absorb(engine.empty_state(), "User: my cat is called Tobrik and I live in Porto.\n" * 3)
    ids = torch.tensor([tok("User: what is my cat called?\n")["input_ids"]], device=device)
    with torch.no_grad():
        adapted = engine(ids.repeat(2, 1), states=[alice, alice]).logits.float()[:1]  # two rows: per-row path
        folded = engine(ids, states=[alice]).logits.float()  # one row: folded into a LoRA pair
    answer = reply(engine, [ReplyRequest(ids[0].tolist(), alice, SamplingConfig.greedy(8, repetition_penalty=1.0))])[0]
    assert torch.isfinite(adapted).all() and len(answer.tokens) + (answer.finish == "end") >= 1
    gap = (adapted - folded).abs().max().item()
    print(f"replied {len(answer.tokens)} tokens ({answer.finish}); folded vs per-row logits: max |diff| {gap:.3g} ({dtype})")
    if dtype == torch.float32:  # in bf16 the two paths round differently; the figure is printed
        assert gap < 1e-3, gap
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print("device check passed")


if __name__ == "__main__":
    main()
