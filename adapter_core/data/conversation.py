"""How conversations become text: the one format shared by absorption, prompts, training and
evaluation, so that a generator is trained on exactly what the app will feed it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROLES = ("user", "assistant")
SYSTEM_PROMPT = ("You are a helpful assistant. You remember what the user told you in earlier "
                 "conversations.")


@dataclass(frozen=True)
class Turn:
    role: str
    """'user' or 'assistant'. In a conversation between named people: 'user' for the words of
    the person whose memory it is ("me"), 'assistant' for everyone else's."""
    text: str
    speaker: str = ""
    """The speaker's name in a conversation between named people ('' in a chat with the assistant,
    where the role says who speaks)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")


def history_text(turns: Sequence[Turn]) -> str:
    """Turns as plain 'User: ...' / 'Assistant: ...' lines: what gets absorbed into memory.

    Plain text rather than a chat template, so the memory format does not change with the model.
    """
    return "".join(f"{t.role.capitalize()}: {t.text.strip()}\n" for t in turns)


LINE_STARTS = {role: history_text([Turn(role, "x")]).split("x")[0] for role in ROLES}
"""How history_text starts each role's line: {"user": "User: ", "assistant": "Assistant: "}."""


def chat_messages(question: str, recent: Sequence[Turn] = (), system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The prompt of one answer: system text, the turns not yet in memory, then the new message."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": t.role, "content": t.text} for t in recent]
    messages.append({"role": "user", "content": question})
    return messages


def prompt_ids(tokenizer, question: str, recent: Sequence[Turn] = (),
               system: str | None = SYSTEM_PROMPT) -> list[int]:
    ids = tokenizer.apply_chat_template(chat_messages(question, recent, system), add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids and attention mask, padded on the left so that generation continues every row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row))
            mask[i, width - len(row):] = 1
    return ids, mask
