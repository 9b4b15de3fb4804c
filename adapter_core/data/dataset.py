"""Conversations with questions, one per JSONL line (see docs/eval-format.md): what the evaluator
reads and what the synthetic personas are made as.

    {"id": "c1",
     "me": "Caroline",                                    (optional, with named speakers)
     "sessions": [{"date": "8 May 2023",                  (optional)
                   "turns": [{"speaker": "Caroline", "text": "..."}, {"speaker": "Melanie", "text": "..."}]}],
     "questions": [{"question": "...", "answer": "...", "aliases": [], "superseded": [],
                    "category": "...", "evidence": [[0, 1]]}],
     "meta": {...}}

A turn names either its role in a chat with the assistant ("role": "user" or "assistant", the
older form) or its speaker ("speaker": a name); one conversation uses one form. Any
conversational-memory dataset converted to this shape runs without code changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .conversation import ROLES, Turn


class FormatError(ValueError):
    """A JSONL line that is not a valid conversation; the message names the file and line."""


@dataclass
class Question:
    question: str
    answer: str
    """The gold answer (the latest value when a fact was updated)."""
    aliases: list[str] = field(default_factory=list)
    """Other strings that also count as correct."""
    superseded: list[str] = field(default_factory=list)
    """Earlier values of an updated fact: answering one of them is answering out of date."""
    category: str = ""
    """Free-form label (kind of fact, "temporal", "multi-hop", ...); the report has a table by it."""
    evidence: list[tuple[int, int]] = field(default_factory=list)
    """Where the answer is said: (session, turn) positions, 0-based ([] when the data does not say)."""


@dataclass(frozen=True)
class Session:
    turns: list[Turn]
    date: str = ""
    """When it took place, as the data writes it ("2023-05-08 13:56", "1:56 pm on 8 May, 2023"); '' if unknown."""


@dataclass
class Conversation:
    id: str
    sessions: list[Session]
    questions: list[Question]
    meta: dict = field(default_factory=dict)
    me: str = ""
    """In a conversation between named people: the speaker whose memory it is ('' when it is
    nobody's: the user asks about other people's conversation)."""

    @property
    def turns(self) -> list[Turn]:
        return [t for session in self.sessions for t in session.turns]

    @property
    def named(self) -> bool:
        """Whether the turns name their speakers (a conversation between people, not a chat with
        the assistant); the evaluator shows such a history as a transcript."""
        return any(t.speaker for s in self.sessions for t in s.turns)

    @property
    def speakers(self) -> list[str]:
        """Speakers' names in order of first appearance ([] in a chat with the assistant)."""
        return list(dict.fromkeys(t.speaker for t in self.turns if t.speaker))

    @property
    def turn_sessions(self) -> list[int]:
        """The session of every turn of `turns`, in order."""
        return [i for i, s in enumerate(self.sessions) for _ in s.turns]

    def turn_index(self, session: int, turn: int) -> int:
        """The position in `turns` of turn `turn` of session `session`."""
        return sum(len(s.turns) for s in self.sessions[:session]) + turn

    def to_json(self) -> dict:
        return {
            "id": self.id,
            **({"me": self.me} if self.me else {}),
            "sessions": [{**({"date": s.date} if s.date else {}),
                          "turns": [{"speaker": t.speaker, "text": t.text} if t.speaker else
                                    {"role": t.role, "text": t.text} for t in s.turns]}
                         for s in self.sessions],
            "questions": [{"question": q.question, "answer": q.answer, "aliases": q.aliases,
                           "superseded": q.superseded, "category": q.category,
                           "evidence": [list(e) for e in q.evidence]} for q in self.questions],
            "meta": self.meta,
        }


def parse_conversation(obj: object) -> Conversation:
    """Validate one decoded JSON object; raise ValueError saying which field is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "me", "sessions", "questions", "meta"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    cid = obj.get("id")
    if not isinstance(cid, (str, int)) or cid == "":
        raise ValueError("'id' must be a non-empty string")
    me = obj.get("me", "")
    if not isinstance(me, str):
        raise ValueError("'me' must be a string")
    sessions = _list(obj, "sessions")
    if not sessions:
        raise ValueError("'sessions' must hold at least one session")
    raw_turns = [(f"sessions[{i}].turns[{j}]", turn)
                 for i, session in enumerate(sessions) for j, turn in enumerate(_list(session, "turns", f"sessions[{i}]"))]
    named = any(isinstance(turn, dict) and "speaker" in turn for _, turn in raw_turns)
    for where, turn in raw_turns:
        _check_turn(where, turn, named)
    speakers = {turn["speaker"] for _, turn in raw_turns} if named else set()
    if me and me not in speakers:
        raise ValueError(f"'me' must name one of the speakers {sorted(speakers)}, got {me!r}"
                         if named else "'me' needs turns with a 'speaker' (a chat's user is always me)")
    parsed_sessions = []
    for i, session in enumerate(sessions):
        date = session.get("date", "")
        if not isinstance(date, str):
            raise ValueError(f"sessions[{i}].date must be a string")
        turns = [Turn("user" if turn["speaker"] == me else "assistant", turn["text"], turn["speaker"]) if named
                 else Turn(turn["role"], turn["text"]) for turn in session["turns"]]
        parsed_sessions.append(Session(turns, date))
    questions = [_parse_question(f"questions[{k}]", q, parsed_sessions) for k, q in enumerate(_list(obj, "questions"))]
    if not questions:
        raise ValueError("'questions' must hold at least one question")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    return Conversation(str(cid), parsed_sessions, questions, meta, me)


def _check_turn(where: str, turn: object, named: bool) -> None:
    if not isinstance(turn, dict):
        raise ValueError(f"{where} must be an object")
    if named:
        # one form per conversation: a chat turn among named ones would have no name to show
        if "role" in turn or not isinstance(turn.get("speaker"), str) or not turn["speaker"].strip():
            raise ValueError(f"{where} needs a non-empty 'speaker' and no 'role' "
                             "(a conversation's turns all name their speaker or all give their role)")
    elif turn.get("role") not in ROLES:
        raise ValueError(f"{where}.role must be one of {ROLES}")
    if not isinstance(turn.get("text"), str):
        raise ValueError(f"{where}.text must be a string")


def _parse_question(where: str, q: object, sessions: list[Session]) -> Question:
    if not isinstance(q, dict):
        raise ValueError(f"{where} must be an object")
    for key in ("question", "answer"):
        if not isinstance(q.get(key), str) or not q[key].strip():
            raise ValueError(f"{where}.{key} must be a non-empty string")
    for key in ("aliases", "superseded"):
        if not isinstance(q.get(key, []), list) or not all(isinstance(a, str) for a in q.get(key, [])):
            raise ValueError(f"{where}.{key} must be a list of strings")
    # "kind" is the older name of "category"; numbers are accepted as some sets number their categories
    given = [q[key] for key in ("category", "kind") if key in q]
    labels = {str(label) for label in given}
    if not all(isinstance(label, str) or type(label) is int for label in given) or len(labels) > 1:
        raise ValueError(f"{where}.category must be a string (or the same one as its older name 'kind')")
    evidence = q.get("evidence", [])
    if not isinstance(evidence, list):
        raise ValueError(f"{where}.evidence must be a list of [session, turn] pairs")
    for e in evidence:
        ok = (isinstance(e, list) and len(e) == 2 and all(type(x) is int for x in e)
              and 0 <= e[0] < len(sessions) and 0 <= e[1] < len(sessions[e[0]].turns))
        if not ok:
            raise ValueError(f"{where}.evidence: {e!r} is not the [session, turn] position of a turn (0-based)")
    return Question(q["question"], q["answer"], list(q.get("aliases", [])), list(q.get("superseded", [])),
                    labels.pop() if labels else "", [tuple(e) for e in evidence])


def _list(obj: object, key: str, where: str = "") -> list:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list):
        raise ValueError(f"{where + '.' if where else ''}{key} must be a list")
    return value


def read_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Conversations of a JSONL file, in order; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield parse_conversation(json.loads(line))
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise FormatError(f"{path}, line {number}: {e}") from None


def write_jsonl(conversations: Iterable[Conversation], path: str | Path) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count
