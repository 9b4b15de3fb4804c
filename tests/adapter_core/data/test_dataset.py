from pathlib import Path

import pytest

from adapter_core.data.dataset import FormatError, read_jsonl, write_jsonl

EXAMPLES = Path(__file__).with_name("three_examples.jsonl")


def test_the_example_file_parses():
    conversations = list(read_jsonl(EXAMPLES))
    assert [c.id for c in conversations] == ["c1", "c2", "c3"]
    assert [len(c.sessions) for c in conversations] == [1, 2, 1]
    assert conversations[1].questions[0].superseded == ["Quenmoor"]
    assert conversations[2].questions[1].aliases == ["four eight two one"]


def test_round_trip(tmp_path):
    conversations = list(read_jsonl(EXAMPLES))
    write_jsonl(conversations, tmp_path / "copy.jsonl")
    assert [c.to_json() for c in read_jsonl(tmp_path / "copy.jsonl")] == [c.to_json() for c in conversations]


@pytest.mark.parametrize("line, message", [
    ("{not json", "Expecting property name"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "x", "sessions": [], "questions": []}', "'sessions' must hold at least one session"),
    ('{"id": "x", "sessions": [{"turns": [{"role": "robot", "text": "hi"}]}], "questions": [{"question": "q", "answer": "a"}]}',
     r"sessions\[0\].turns\[0\].role must be one of"),
    ('{"id": "x", "sessions": [{"turns": []}], "questions": [{"question": "q"}]}', r"questions\[0\].answer must be"),
    ('{"id": "x", "sessions": [{"turns": []}], "questions": [{"question": "q", "answer": "a"}], "extra": 1}',
     r"unknown fields \['extra'\]"),
])
def test_a_malformed_line_is_named(tmp_path, line, message):
    good = EXAMPLES.read_text().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, good, line, good]) + "\n")
    with pytest.raises(FormatError, match=rf"bad.jsonl, line 3: .*{message}"):
        list(read_jsonl(path))
