"""Train the adapter generator: `python -m adapter_core.train --config configs/train.toml`.

A run folder that already holds a run is resumed from its last checkpoint; the data stream is
a function of (seed, step), so the resumed run sees what an uninterrupted one would have seen.
Flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import logging

from .training.trainer import Trainer, TrainConfig, TrainingProgress


def main(argv: list[str] | None = None) -> TrainingProgress:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with TrainConfig fields (see adapter_core/training/trainer.py)")
    p.add_argument("--output-dir", help="run folder (resumed when it holds a run)")
    p.add_argument("--time-budget-minutes", type=float, help="stop this session after this many minutes of training")
    p.add_argument("--stop-at", type=float, help="stop by this wall-clock time (Unix seconds), loading included")
    p.add_argument("--max-steps", type=int, help="stop at this step (over all sessions)")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--init-checkpoint", help="generator folder to start a new run from")
    p.add_argument("--cache-dir", help="cache of the dequantized default model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    overrides = {"output_dir": args.output_dir, "time_budget_minutes": args.time_budget_minutes, "stop_at": args.stop_at,
                 "max_steps": args.max_steps, "device": args.device, "init_checkpoint": args.init_checkpoint,
                 "cache_dir": args.cache_dir}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    done = Trainer(config).train(show_progress=not args.no_progress)
    print(f"stopped at step {done.step} after {done.tokens:,} tokens; run folder: {config.output_dir}")
    return done


if __name__ == "__main__":
    main()
