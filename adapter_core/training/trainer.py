"""The training loop: resumable, time-budgeted, with periodic held-out evaluation.

A run lives in one folder: the generator (config + shards), trainer_state.json (the progress:
step, tokens, elapsed time, log; beside it the training config with its data recipe),
optionally the optimizer state (shards too), train_log.jsonl and training_curve.png. Saving
writes a new folder and swaps it in, so a crash never leaves a half-written checkpoint.

The held-out check scores greedy answers with the evaluator, so training imports evaluation
(the runner) and never the reverse; the data both are made of lives in adapter_core.data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..memory.checkpoint import load_sharded, save_sharded
from ..memory.config import GeneratorConfig
from ..data.conversation import history_text
from ..data.personas import make_eval_set
from ..engine import load_engine
from ..evaluation.runner import EvalOptions, evaluate, swap_partners
from ..memory.model import GenerativeAdapterModel
from ..memory.windows import pack_training_batch
from .objectives import DataRecipe, DataSource, qa_windows
from .plot import plot_training

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"


@dataclass
class TrainConfig:
    output_dir: str = "runs/generator"
    """Folder of the run: checkpoint, log and plot. An existing run there is resumed."""
    model: str | None = None
    """Base model id or path; None: the embedded default."""
    init_checkpoint: str | None = None
    """Generator to start a new run from (ignored when output_dir already holds a run)."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """Shape of a new generator (ignored when starting from a checkpoint)."""
    data: DataRecipe = field(default_factory=DataRecipe)
    """What the batches are made of."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 100
    """Linear warm-up; the rate then stays constant, since a time budget fixes no total step count.
    A run resumed without AdamW's moments warms up again (their restart would jolt the weights)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clipping."""
    max_steps: int = 10_000
    """Stop after this many steps (counted over all resumed sessions)."""
    time_budget_minutes: float | None = None
    """Stop this session after this many minutes of training (then save), whatever the step."""
    stop_at: float | None = None
    """Stop by this wall-clock time (Unix seconds; then save), whatever the step: for a call with a
    hard limit (a lent GPU's), counting the model's loading too."""
    eval_every: int = 200
    """Steps between held-out evaluations (0: never)."""
    eval_questions: int = 32
    """Held-out questions per evaluation (3 facts, about 512 tokens of history)."""
    save_every: int = 200
    """Steps between checkpoints (a final one is always written)."""
    save_optimizer: bool = True
    """Keep AdamW's moments so a resumed run continues exactly (twice the generator's size)."""
    seed: int = 0
    """Seed of the data stream and of a new generator."""
    device: str | None = None
    """cpu or cuda; None: cuda when available. CUDA runs the frozen model in bf16."""
    cache_dir: str | None = "data/model-cache"
    """Cache of the dequantized default model."""

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config fields: {unknown}")
        if "generator" in d:
            d["generator"] = GeneratorConfig.from_dict(d["generator"])
        if "data" in d:
            d["data"] = DataRecipe(**d["data"])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["generator"] = self.generator.to_dict()
        return d


@dataclass
class TrainingProgress:
    """How far a run has got, over all of its sessions: saved as trainer_state.json."""

    step: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Real (unpadded) tokens trained on."""
    seconds: float = 0.0
    """Time spent in training steps (evaluation and saving not counted)."""
    log: list[dict] = field(default_factory=list)
    """One entry per step (objective, loss, grad_norm, tokens_per_s) and per held-out evaluation."""

    @classmethod
    def load(cls, path: str | Path) -> "TrainingProgress":
        """Read trainer_state.json; the config and ids saved beside the progress are not part of it."""
        saved = json.loads(Path(path).read_text())
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    def __init__(self, config: TrainConfig, engine: GenerativeAdapterModel | None = None):
        self.config = config
        self.out = Path(config.output_dir)
        resuming = (self.out / STATE_NAME).exists()
        if engine is None:
            checkpoint = self.out if resuming else config.init_checkpoint
            engine = load_engine(config.model, checkpoint, config=config.generator, device=config.device,
                                 cache_dir=config.cache_dir, use_shipped=False)
        elif resuming:
            engine.load_generator_weights(self.out)
        self.engine = engine
        self.progress = TrainingProgress.load(self.out / STATE_NAME) if resuming else TrainingProgress()
        if resuming:
            log.info("resuming %s at step %d", self.out, self.progress.step)
        torch.manual_seed(config.seed)
        self.optimizer = torch.optim.AdamW(engine.generator_parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        restored = self._load_optimizer() if resuming else False
        # the step the learning rate warms up from: 0, or a resume's first without AdamW's moments
        self.warmup_from = self.progress.step if resuming and not restored else 0
        self.data = DataSource(engine.tokenizer, config.data, engine.config.window, config.seed)
        self._eval_set = make_eval_set(config.seed, [3], [512], config.eval_questions) if config.eval_every else []
        self._check_seconds = 0.0  # how long the last held-out check took

    # --- loop ---------------------------------------------------------------------------------------

    def train(self, show_progress: bool = True) -> TrainingProgress:
        cfg, engine = self.config, self.engine
        engine.train()
        deadlines = [time.monotonic() + 60 * cfg.time_budget_minutes] if cfg.time_budget_minutes is not None else []
        if cfg.stop_at is not None:
            deadlines.append(time.monotonic() + cfg.stop_at - time.time())
        deadline = min(deadlines, default=None)
        # In a log file (no terminal) a bar redrawn ten times a second would bury everything else.
        bar = tqdm(total=cfg.max_steps, initial=self.progress.step, disable=not show_progress, desc="training",
                   unit="step", mininterval=0.1 if sys.stderr.isatty() else 30)
        saved = (self.progress.step, len(self.progress.log))  # what the folder holds: a final save if it changed
        while self.progress.step < cfg.max_steps:
            if deadline is not None and time.monotonic() > deadline:
                log.info("time budget reached at step %d", self.progress.step)
                break
            started = time.perf_counter()
            step = self.progress.step
            objective, batch = self.data.batch(step)
            lr = self.learning_rate(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, _ = engine.loss(batch)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.generator_parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - started
            tokens = batch.tokens
            self.progress.step = step + 1
            self.progress.tokens += tokens
            self.progress.seconds += seconds
            entry = {"step": step + 1, "objective": objective, "loss": round(loss.item(), 5),
                     "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tokens / seconds, 1),
                     "lr": float(f"{lr:.4g}")}
            self.progress.log.append(entry)
            bar.update(1)
            bar.set_postfix(objective=objective[:5], loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"loss became {entry['loss']} at step {step + 1}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0:  # before the check: it cannot lose steps
                self.save()
                saved = (self.progress.step, len(self.progress.log))
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                self._periodic_check(step + 1, deadline)
        bar.close()
        if engine.device.type == "cuda":  # tells the next run how far the batch size can grow
            log.info("peak GPU memory: %.1f GiB", torch.cuda.max_memory_allocated() / 2**30)
        if saved != (self.progress.step, len(self.progress.log)) or not (self.out / STATE_NAME).exists():
            self.save()
        return self.progress

    def _periodic_check(self, step: int, deadline: float | None) -> None:
        """The held-out check, logged with its duration. Skipped where the last one's duration would
        take it past the deadline (a lent GPU's call has a hard limit), and a failing check is logged,
        not fatal: the training is what the run is for."""
        if deadline is not None and time.monotonic() + self._check_seconds > deadline:
            log.info("held-out check at step %d skipped: it would end after the time budget", step)
            return
        started = time.monotonic()
        try:
            entry = self.evaluate()
        except Exception as e:  # noqa: BLE001 - any failure of the check: say so, go on training
            log.exception("held-out check at step %d failed; training goes on", step)
            entry = {"eval_error": f"{type(e).__name__}: {e}"}
        self._check_seconds = time.monotonic() - started
        self.progress.log.append({"step": step, **entry, "eval_seconds": round(self._check_seconds, 1)})

    def learning_rate(self, step: int) -> float:
        """The rate of step `step` (0-based): linear warm-up from warmup_from, then constant."""
        cfg = self.config
        return cfg.learning_rate * min(1.0, (step + 1 - self.warmup_from) / max(1, cfg.warmup_steps))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out answer NLL (teacher-forced, the training prompts) and greedy accuracy in adapter
        mode, each also under another user's adapter (the next conversation's: the swap test)."""
        engine = self.engine
        engine.eval()
        conversations = self._eval_set
        swap = len(conversations) > 1  # the swap test needs another user
        try:
            nll = self._answer_nll(conversations, conversations)
            swapped_nll = self._answer_nll(swap_partners(conversations), conversations) if swap else None
            modes = ("adapter", "adapter_swapped") if swap else ("adapter",)
            results = evaluate(engine, conversations, EvalOptions(modes=modes), progress=False)
        finally:
            engine.train()
        own = [r for r in results if r.mode == "adapter"]
        entry = {"eval_nll": round(nll, 4), "eval_accuracy": round(sum(r.contains for r in own) / len(own), 4),
                 "eval_n": len(own)}
        if swap:
            swapped = [r for r in results if r.mode == "adapter_swapped"]
            entry |= {"eval_nll_swapped": round(swapped_nll, 4), "eval_swap_gap": round(swapped_nll - nll, 4),
                      "eval_accuracy_swapped": round(sum(r.contains for r in swapped) / len(swapped), 4)}
        log.info("held-out (%d questions): %s", len(own), entry)
        return entry

    def _answer_nll(self, memories: list, asked: list) -> float:
        """Mean NLL per answer token of asked[i]'s questions with memories[i]'s history absorbed."""
        engine = self.engine
        per_user = [qa_windows(engine.tokenizer, engine.config.window, history_text(m.turns), [],
                               [(q.question, q.answer) for q in c.questions]) for m, c in zip(memories, asked)]
        losses = []
        for start in range(0, len(per_user), self.config.data.batch_size):
            packed = pack_training_batch(per_user[start:start + self.config.data.batch_size],
                                         engine.tokenizer.pad_token_id)
            loss, n = engine.loss(packed)
            losses.append((loss.item(), n))
        return sum(value * n for value, n in losses) / sum(n for _, n in losses)

    # --- checkpoints -------------------------------------------------------------------------------

    def save(self) -> Path:
        tmp = self.out.with_name(self.out.name + ".saving")
        shutil.rmtree(tmp, ignore_errors=True)
        self.engine.save_generator(tmp, extra={"trained_steps": self.progress.step,
                                               "trained_tokens": self.progress.tokens})
        if self.config.save_optimizer:
            save_sharded(_flatten_optimizer(self.optimizer), tmp / OPTIMIZER_DIR)
            (tmp / OPTIMIZER_DIR / "param_groups.json").write_text(
                json.dumps([{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]))
        saved = dict(self.progress.to_dict(), config=self.config.to_dict(), generator_id=self.engine.generator_id,
                     base_model_id=self.engine.base_model_id)
        (tmp / STATE_NAME).write_text(json.dumps(saved, indent=1))
        with open(tmp / "train_log.jsonl", "w") as f:
            for entry in self.progress.log:
                f.write(json.dumps(entry) + "\n")
        plot_training(self.progress.log, tmp / "training_curve.png")
        for keep in ("MODEL_CARD.md", "eval"):  # written by people or the evaluator, not by the trainer
            if (self.out / keep).exists():
                shutil.move(str(self.out / keep), str(tmp / keep))
        old = self.out.with_name(self.out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.out.exists():
            self.out.rename(old)
        tmp.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
        log.info("saved step %d to %s", self.progress.step, self.out)
        return self.out

    def _load_optimizer(self) -> bool:
        """AdamW's moments from the run's folder; False where it has none (the shipped checkpoint
        keeps none, to stay small)."""
        folder = self.out / OPTIMIZER_DIR
        if not folder.exists():
            log.warning("no optimizer state in %s: AdamW restarts from zero moments, and the learning rate "
                        "warms up again over %d steps", self.out, self.config.warmup_steps)
            return False
        flat = load_sharded(folder)
        groups = json.loads((folder / "param_groups.json").read_text())
        params = self.optimizer.param_groups[0]["params"]
        state = {}
        for key, tensor in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor.to(params[int(index)].device)
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": [dict(g, params=list(range(len(params)))) for g in groups]})
        return True


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            flat[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat
