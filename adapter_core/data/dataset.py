"""Conversations with questions, one per JSONL line (see docs/eval-format.md): what the evaluator
reads and what the synthetic personas are made as.

    {"id": "c1",
     "sessions": [{"turns": [{"role": "user", "text": "..."}, {"role": "assistant", "text": "..."}]}],
     "questions": [{"question": "...", "answer": "...", "aliases": [], "superseded": [], "kind": "..."}],
     "meta": {...}}

Any conversational-memory dataset converted to this shape runs without code changes.
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
    kind: str = ""
    """Optional label (for example the kind of fact), reported per kind."""


@dataclass
class Conversation:
    id: str
    sessions: list[list[Turn]]
    questions: list[Question]
    meta: dict = field(default_factory=dict)

    @property
    def turns(self) -> list[Turn]:
        return [t for session in self.sessions for t in session]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "sessions": [{"turns": [{"role": t.role, "text": t.text} for t in s]} for s in self.sessions],
            "questions": [q.__dict__ for q in self.questions],
            "meta": self.meta,
        }


def parse_conversation(obj: object) -> Conversation:
    """Validate one decoded JSON object; raise ValueError saying which field is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "sessions", "questions", "meta"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    cid = obj.get("id")
    if not isinstance(cid, (str, int)) or cid == "":
        raise ValueError("'id' must be a non-empty string")
    sessions = _list(obj, "sessions")
    if not sessions:
        raise ValueError("'sessions' must hold at least one session")
    parsed_sessions = []
    for i, session in enumerate(sessions):
        turns = _list(session, "turns", f"sessions[{i}]")
        parsed = []
        for j, turn in enumerate(turns):
            where = f"sessions[{i}].turns[{j}]"
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                raise ValueError(f"{where}.role must be one of {ROLES}")
            if not isinstance(turn.get("text"), str):
                raise ValueError(f"{where}.text must be a string")
            parsed.append(Turn(turn["role"], turn["text"]))
        parsed_sessions.append(parsed)
    questions = []
    for k, q in enumerate(_list(obj, "questions")):
        where = f"questions[{k}]"
        if not isinstance(q, dict):
            raise ValueError(f"{where} must be an object")
        for key in ("question", "answer"):
            if not isinstance(q.get(key), str) or not q[key].strip():
                raise ValueError(f"{where}.{key} must be a non-empty string")
        for key in ("aliases", "superseded"):
            if not isinstance(q.get(key, []), list) or not all(isinstance(a, str) for a in q.get(key, [])):
                raise ValueError(f"{where}.{key} must be a list of strings")
        questions.append(Question(q["question"], q["answer"], list(q.get("aliases", [])),
                                  list(q.get("superseded", [])), str(q.get("kind", ""))))
    if not questions:
        raise ValueError("'questions' must hold at least one question")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    return Conversation(str(cid), parsed_sessions, questions, meta)


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
