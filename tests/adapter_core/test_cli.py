import json
import shlex
from pathlib import Path

import pytest

from adapter_core import evaluate as evaluate_cli
from adapter_core.data.dataset import read_jsonl

TWO_SPEAKERS = Path(__file__).parent / "data" / "two_speakers.jsonl"


def test_evaluator_writes_the_synthetic_heldout_set_in_the_generic_format(tmp_path):
    path = tmp_path / "heldout.jsonl"
    evaluate_cli.main(["--synthetic", "--facts", "1", "3", "--lengths", "300", "--per-cell", "6",
                       "--write-data", str(path)])
    conversations = list(read_jsonl(path))
    assert sum(len(c.questions) for c in conversations if c.meta["n_facts"] == 3) >= 6
    assert {c.meta["split"] for c in conversations} == {"eval"}
    assert all(q.category and q.evidence for c in conversations for q in c.questions)


def test_a_run_records_its_command_line_and_context_limit(tmp_path, monkeypatch, make_text_engine):
    monkeypatch.setattr(evaluate_cli, "load_engine", lambda *args, **kwargs: make_text_engine())
    out = tmp_path / "an out folder"
    argv = ["--data", str(TWO_SPEAKERS), "--modes", "closed_book", "full_history", "--context-limit", "450",
            "--max-new-tokens", "2", "--out", str(out)]
    evaluate_cli.main(argv)
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "python -m adapter_core.evaluate " + shlex.join(argv)
    assert shlex.split(report["command"])[3:] == argv  # the space in the folder's name is quoted
    assert report["context_limit"] == 450
    full = next(h for h in report["history"] if h["mode"] == "full_history")
    assert full["truncated"] > 0 and full["with_evidence"] == 6
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 14 and {"category", "contains", "f1", "date_match", "evidence_cut"} <= set(answers[0])
    assert "## By question category" in (out / "report.md").read_text()


def test_by_default_every_mode_runs_and_the_swap_test_only_with_two_conversations(tmp_path, monkeypatch,
                                                                                   make_text_engine):
    monkeypatch.setattr(evaluate_cli, "load_engine", lambda *args, **kwargs: make_text_engine())
    for limit, swapped in (("2", True), ("1", False)):
        out = tmp_path / limit
        evaluate_cli.main(["--data", str(TWO_SPEAKERS), "--limit", limit, "--max-new-tokens", "1", "--out", str(out)])
        report = json.loads((out / "report.json").read_text())
        assert ("adapter_swapped" in report["modes"]) == swapped == (report["swap_test"] is not None)
    with pytest.raises(SystemExit, match="at least two conversations"):
        evaluate_cli.main(["--data", str(TWO_SPEAKERS), "--limit", "1", "--modes", "adapter_swapped",
                           "--out", str(tmp_path / "x")])


def test_the_finetune_flags_change_only_their_own_fields_of_the_defaults():
    from dataclasses import asdict

    from adapter_core.memory.finetune import FinetuneConfig

    defaults = evaluate_cli.finetune_config(evaluate_cli.parser().parse_args(["--synthetic"]))
    assert defaults == FinetuneConfig()
    changed = evaluate_cli.finetune_config(evaluate_cli.parser().parse_args(
        ["--synthetic", "--finetune-steps", "16", "--finetune-lr", "5e-3", "--finetune-anchor-tokens", "512",
         "--finetune-recall", "none"]))
    differ = {k: v for k, v in asdict(changed).items() if asdict(defaults)[k] != v}
    assert differ == {"steps": 16, "lr": 5e-3, "anchor_tokens": 512, "recall": "none"}
    with pytest.raises(SystemExit):
        evaluate_cli.parser().parse_args(["--synthetic", "--finetune-loss-on", "assistant"])
