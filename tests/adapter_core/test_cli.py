from adapter_core import evaluate as evaluate_cli
from adapter_core.data.dataset import read_jsonl


def test_evaluator_writes_the_synthetic_heldout_set_in_the_generic_format(tmp_path):
    path = tmp_path / "heldout.jsonl"
    evaluate_cli.main(["--synthetic", "--facts", "1", "3", "--lengths", "300", "--per-cell", "6",
                       "--write-data", str(path)])
    conversations = list(read_jsonl(path))
    assert sum(len(c.questions) for c in conversations if c.meta["n_facts"] == 3) >= 6
    assert {c.meta["split"] for c in conversations} == {"eval"}
