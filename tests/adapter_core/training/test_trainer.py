import json
import time

import pytest
import torch

from adapter_core import GenerativeAdapterModel
from adapter_core.memory.checkpoint import MAX_SHARD_BYTES
from adapter_core.training.objectives import DataRecipe
from adapter_core.training.trainer import STATE_NAME, Trainer, TrainConfig, TrainingProgress


def config(folder, **overrides) -> TrainConfig:
    options = dict(output_dir=str(folder), max_steps=4, warmup_steps=1, learning_rate=1e-2, eval_every=0,
                   save_every=2, data=DataRecipe(batch_size=2, qa_facts=(1, 2), qa_lengths=(60,), mix={"qa": 1.0}))
    return TrainConfig(**(options | overrides))


def weights(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.generator_state_dict().items()}


def test_resuming_continues_the_same_run(make_text_engine, tmp_path):
    straight = make_text_engine()
    Trainer(config(tmp_path / "a"), straight).train(show_progress=False)

    Trainer(config(tmp_path / "b", max_steps=2), make_text_engine()).train(show_progress=False)
    resumed_engine = make_text_engine()  # fresh weights: the trainer must load the run's
    done = Trainer(config(tmp_path / "b"), resumed_engine).train(show_progress=False)

    assert done.step == 4
    a, b = weights(straight), weights(resumed_engine)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log_a = [e["loss"] for e in json.loads((tmp_path / "a" / STATE_NAME).read_text())["log"]]
    log_b = [e["loss"] for e in json.loads((tmp_path / "b" / STATE_NAME).read_text())["log"]]
    assert log_a == pytest.approx(log_b, abs=1e-4)
    untrained = weights(make_text_engine())
    assert any(not torch.equal(a[k], untrained[k]) for k in a)  # training changed something


@pytest.mark.parametrize("save_optimizer", [True, False])
def test_a_resume_without_adamw_s_moments_warms_up_again(make_text_engine, tmp_path, save_optimizer):
    options = dict(warmup_steps=4, save_optimizer=save_optimizer)
    Trainer(config(tmp_path, max_steps=2, **options), make_text_engine()).train(show_progress=False)
    done = Trainer(config(tmp_path, max_steps=4, **options), make_text_engine()).train(show_progress=False)
    rates = [e["lr"] / 1e-2 for e in done.log]
    # with the moments the warm-up goes on where it stopped; without, it starts again
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0] if save_optimizer else [0.25, 0.5, 0.25, 0.5])


def test_a_run_saved_before_progress_was_a_dataclass_resumes(make_text_engine, tmp_path):
    Trainer(config(tmp_path, max_steps=2), make_text_engine()).train(show_progress=False)
    saved = json.loads((tmp_path / STATE_NAME).read_text())
    assert list(saved) == ["step", "tokens", "seconds", "log", "config", "generator_id", "base_model_id"]
    # trainer_state.json as the trainer wrote it when its progress was a dict called state
    old = {"step": 2, "tokens": 1000, "seconds": 3.5, "log": saved["log"]}
    old |= {"config": saved["config"], "generator_id": saved["generator_id"], "base_model_id": saved["base_model_id"]}
    (tmp_path / STATE_NAME).write_text(json.dumps(old, indent=1))

    trainer = Trainer(config(tmp_path), make_text_engine())
    assert trainer.progress == TrainingProgress(step=2, tokens=1000, seconds=3.5, log=saved["log"])
    done = trainer.train(show_progress=False)
    assert done.step == 4 and done.tokens > 1000 and done.seconds > 3.5
    assert [e["step"] for e in done.log] == [1, 2, 3, 4]
    resaved = json.loads((tmp_path / STATE_NAME).read_text())
    assert list(resaved) == list(saved) and resaved["step"] == 4


def test_checkpoint_round_trip(make_text_engine, make_text_lm, tiny_tokenizer, tmp_path):
    engine = make_text_engine()
    Trainer(config(tmp_path, max_steps=2), engine).train(show_progress=False)
    shards = list(tmp_path.glob("generator-*.safetensors")) + list((tmp_path / "optimizer").glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= MAX_SHARD_BYTES + 4096 for p in shards)
    saved = json.loads((tmp_path / STATE_NAME).read_text())
    assert saved["config"]["data"]["mix"] == {"qa": 1.0}  # the data recipe travels with the checkpoint
    assert (tmp_path / "training_curve.png").stat().st_size > 0
    loaded = GenerativeAdapterModel.from_checkpoint(make_text_lm(seed=5), tmp_path, "tiny-text",
                                                    tiny_tokenizer)
    assert loaded.generator_id == engine.generator_id == saved["generator_id"]


@pytest.mark.parametrize("limit", [dict(time_budget_minutes=0.0), dict(stop_at=0.0)])  # minutes, a clock time
def test_time_budget_stops_and_saves(make_text_engine, tmp_path, limit):
    done = Trainer(config(tmp_path, **limit), make_text_engine()).train(show_progress=False)
    assert done.step == 0
    assert (tmp_path / STATE_NAME).exists()


def test_a_stop_time_ahead_lets_it_train(make_text_engine, tmp_path):
    done = Trainer(config(tmp_path, stop_at=time.time() + 600), make_text_engine()).train(show_progress=False)
    assert done.step == 4


def test_periodic_evaluation_is_logged_with_the_swap_test(make_text_engine, tmp_path):
    done = Trainer(config(tmp_path, max_steps=2, eval_every=2, eval_questions=6), make_text_engine(live=True)).train(
        show_progress=False)  # 6 questions at 3 facts: two users, so one's adapter can answer the other's
    evals = [e for e in done.log if "eval_accuracy" in e]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["eval_n"] >= 6
    e = evals[0]
    assert e["eval_nll"] > 0 and e["eval_nll_swapped"] > 0 and 0 <= e["eval_accuracy_swapped"] <= 1
    # another user's memory answers: the two NLLs differ (a swap that kept the own memory would give 0)
    assert e["eval_swap_gap"] == pytest.approx(e["eval_nll_swapped"] - e["eval_nll"], abs=2e-4) != 0


def test_the_last_check_is_saved_and_a_failing_or_overlong_check_does_not_stop_training(make_text_engine, tmp_path,
                                                                                         monkeypatch):
    done = Trainer(config(tmp_path / "a", max_steps=2, eval_every=2, eval_questions=3), make_text_engine()).train(
        show_progress=False)
    saved = json.loads((tmp_path / "a" / STATE_NAME).read_text())["log"]
    assert saved == done.log and "eval_accuracy" in saved[-1] and saved[-1]["eval_seconds"] >= 0  # saved after it

    failing = Trainer(config(tmp_path / "b", eval_every=1, eval_questions=3), make_text_engine())
    monkeypatch.setattr(failing, "evaluate", lambda: 1 / 0)
    done = failing.train(show_progress=False)
    assert done.step == 4 and [e["eval_error"] for e in done.log if "eval_error" in e] == ["ZeroDivisionError: division by zero"] * 4

    slow = Trainer(config(tmp_path / "c", eval_every=1, eval_questions=3, stop_at=time.time() + 600), make_text_engine())
    slow._check_seconds = 3600.0  # the last check took an hour: none fits before the deadline
    done = slow.train(show_progress=False)
    assert done.step == 4 and not any("eval_n" in e for e in done.log)


def test_with_one_held_out_user_the_evaluation_skips_the_swap_test(make_text_engine, tmp_path):
    done = Trainer(config(tmp_path, max_steps=1, eval_every=1, eval_questions=3), make_text_engine()).train(
        show_progress=False)
    (e,) = [e for e in done.log if "eval_accuracy" in e]
    assert e["eval_n"] == 3 and "eval_swap_gap" not in e


def test_toml_config(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('max_steps = 7\n[generator]\nrank = 4\n[data]\nbatch_size = 3\n[data.mix]\nqa = 1.0\n')
    loaded = TrainConfig.from_toml(path)
    assert (loaded.max_steps, loaded.generator.rank, loaded.data.batch_size, loaded.data.mix) == (7, 4, 3, {"qa": 1.0})
    path.write_text("max_stepz = 7\n")
    with pytest.raises(ValueError, match=r"unknown training config fields: \['max_stepz'\]"):
        TrainConfig.from_toml(path)
