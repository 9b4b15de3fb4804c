import json
from pathlib import Path

import pytest

from adapter_core.data.dataset import FormatError, parse_conversation, read_jsonl, write_jsonl

EXAMPLES = Path(__file__).with_name("three_examples.jsonl")
TWO_SPEAKERS = Path(__file__).with_name("two_speakers.jsonl")


def test_the_example_file_parses():
    conversations = list(read_jsonl(EXAMPLES))
    assert [c.id for c in conversations] == ["c1", "c2", "c3"]
    assert [len(c.sessions) for c in conversations] == [1, 2, 1]
    assert conversations[1].questions[0].superseded == ["Quenmoor"]
    assert conversations[2].questions[1].aliases == ["four eight two one"]
    assert not any(c.named or c.me or c.speakers for c in conversations)


def test_named_speakers_dates_categories_and_evidence():
    caroline, joanna = read_jsonl(TWO_SPEAKERS)
    assert caroline.named and caroline.speakers == ["Caroline", "Melanie"] and caroline.me == ""
    assert [s.date for s in caroline.sessions] == ["1:56 pm on 8 May, 2023", "25 May 2023", "2023-06-09 10:15"]
    assert {t.role for t in caroline.turns} == {"assistant"}  # nobody's words are "mine"
    assert joanna.me == "Joanna" and joanna.sessions[1].date == ""
    assert [t.role for t in joanna.turns] == ["user", "assistant", "user", "assistant", "user"]
    multi_hop = caroline.questions[1]
    assert multi_hop.category == "multi-hop" and multi_hop.evidence == [(1, 0), (2, 1)]
    assert [caroline.turn_index(s, t) for s, t in multi_hop.evidence] == [4, 8]
    assert "Luna" in caroline.turns[8].text and caroline.turn_sessions[8] == 2
    assert caroline.questions[3].evidence == []


def test_round_trip(tmp_path):
    for path in (EXAMPLES, TWO_SPEAKERS):
        conversations = list(read_jsonl(path))
        write_jsonl(conversations, tmp_path / "copy.jsonl")
        assert [c.to_json() for c in read_jsonl(tmp_path / "copy.jsonl")] == [c.to_json() for c in conversations]


# a line as the evaluator wrote it before speakers, dates, categories and evidence (Question.__dict__)
OLD_LINE = ('{"id": "eval-f1-t512-000000", "sessions": [{"turns": [{"role": "user", "text": "Hi there."}, '
            '{"role": "assistant", "text": "Hi!"}]}, {"turns": [{"role": "user", "text": "My cat is called Tobrik."}, '
            '{"role": "assistant", "text": "Noted!"}]}], "questions": [{"question": "What is my cat called?", '
            '"answer": "Tobrik", "aliases": [], "superseded": ["Mog"], "kind": "pet_name"}], '
            '"meta": {"split": "eval", "n_facts": 1, "target_tokens": 512, "updates": 1}}')


def test_a_file_in_the_older_format_still_loads(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(OLD_LINE + "\n")
    (c,) = read_jsonl(path)
    assert not c.named and c.me == "" and [s.date for s in c.sessions] == ["", ""]
    assert [(t.role, t.speaker) for t in c.turns] == [("user", ""), ("assistant", "")] * 2
    q = c.questions[0]
    assert (q.category, q.superseded, q.evidence) == ("pet_name", ["Mog"], [])
    written = c.to_json()
    assert written["sessions"] == json.loads(OLD_LINE)["sessions"]  # a chat is written as before
    assert written["questions"][0]["category"] == "pet_name" and "kind" not in written["questions"][0]


def test_kind_is_the_older_name_of_category():
    line = json.loads(EXAMPLES.read_text().splitlines()[0])
    line["questions"][0]["kind"] = "pet_name"
    assert parse_conversation(line).questions[0].category == "pet_name"
    del line["questions"][0]["kind"]
    line["questions"][0]["category"] = 3  # some sets number their categories
    assert parse_conversation(line).questions[0].category == "3"


NAMED = ('{"id": "x", %s"sessions": [{%s"turns": [{"speaker": "Ann", "text": "hi"}, %s]}], '
         '"questions": [{"question": "q", "answer": "a"%s}]}')


@pytest.mark.parametrize("line, message", [
    ("{not json", "Expecting property name"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "x", "sessions": [], "questions": []}', "'sessions' must hold at least one session"),
    ('{"id": "x", "sessions": [{"turns": [{"role": "robot", "text": "hi"}]}], "questions": [{"question": "q", "answer": "a"}]}',
     r"sessions\[0\].turns\[0\].role must be one of"),
    ('{"id": "x", "sessions": [{"turns": []}], "questions": [{"question": "q"}]}', r"questions\[0\].answer must be"),
    ('{"id": "x", "sessions": [{"turns": []}], "questions": [{"question": "q", "answer": "a"}], "extra": 1}',
     r"unknown fields \['extra'\]"),
    (NAMED % ("", "", '{"role": "user", "text": "hi"}', ""), r"sessions\[0\].turns\[1\] needs a non-empty 'speaker'"),
    (NAMED % ('"me": "Bob", ', "", '{"speaker": "Cy", "text": "yo"}', ""), r"'me' must name one of the speakers \['Ann', 'Cy'\]"),
    (NAMED % ("", '"date": 2023, ', '{"speaker": "Cy", "text": "yo"}', ""), r"sessions\[0\].date must be a string"),
    (NAMED % ("", "", '{"speaker": "Cy", "text": "yo"}', ', "evidence": [[0, 2]]'), r"questions\[0\].evidence: \[0, 2\] is not"),
    (NAMED % ("", "", '{"speaker": "Cy", "text": "yo"}', ', "category": "a", "kind": "b"'), r"questions\[0\].category must be"),
    ('{"id": "x", "me": "Ann", "sessions": [{"turns": [{"role": "user", "text": "hi"}]}], '
     '"questions": [{"question": "q", "answer": "a"}]}', "'me' needs turns with a 'speaker'"),
])
def test_a_malformed_line_is_named(tmp_path, line, message):
    good = EXAMPLES.read_text().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, good, line, good]) + "\n")
    with pytest.raises(FormatError, match=rf"bad.jsonl, line 3: .*{message}"):
        list(read_jsonl(path))
