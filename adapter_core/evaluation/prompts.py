"""How a conversation is put before the model: the text absorbed into the adapter, the prompt
of a question, and the rule for prompts that would not fit.

A chat with the assistant (turns with roles: the synthetic set, the app's users) is shown as the
app shows it and as training does: the turns not in memory as chat messages, the absorbed ones
as `history_text`. A conversation between named people is a quoted transcript with names and
session dates, in one user message before the question (full history) or absorbed as that same
text (adapter modes); the question is then the user's, about that conversation, so the model
answers it instead of going on with the dialogue:

    Transcript of the conversations between Caroline and Melanie.

    Session 1, 1:56 pm on 8 May, 2023:
    Caroline said: "I went to a support group yesterday."
    Melanie said: "That's brave!"

    Question about the conversations between Caroline and Melanie: When did Caroline go to the
    support group? Answer in a few words.

Every prompt, in every mode, ends with the same request for a short answer (SHORT_ANSWER).
"""

from __future__ import annotations

from ..data.conversation import history_text, prompt_ids
from ..data.dataset import Conversation
from ..serving.decoding import fewest_dropped, fit_prompt

SHORT_ANSWER = "Answer in a few words."


def turn_lines(conversation: Conversation) -> list[str]:
    """Every turn as the one line it is in the absorbed text (chat: 'User: ...'; transcript:
    'Name said: "..."', reported speech: with 'Name: ...' lines the 135M model went on with the
    dialogue more often: 3 of the 7 full-history answers to tests/adapter_core/data/two_speakers.jsonl
    against 1 of 7, SmolLM2-135M, untrained generator)."""
    if not conversation.named:
        return [history_text([t]) for t in conversation.turns]
    return [f'{t.speaker} said: "{" ".join(t.text.split())}"\n' for t in conversation.turns]


def memory_text(conversation: Conversation, stop: int) -> str:
    """The text of the first `stop` turns, as absorbed into an adapter."""
    if not conversation.named:
        return history_text(conversation.turns[:stop])
    return _transcript(conversation, 0, stop) if stop else ""


def question_text(conversation: Conversation, question: str) -> str:
    """The user's message that asks the question (after the transcript, in full history)."""
    if not conversation.named:
        return f"{question} {SHORT_ANSWER}"
    return f"Question about {_people(conversation)}: {question} {SHORT_ANSWER}"


def prompt(tokenizer, conversation: Conversation, question: str, shown: int) -> list[int]:
    """The prompt's ids, showing the latest `shown` turns before the question."""
    turns = conversation.turns
    start = len(turns) - shown
    if not conversation.named:
        return prompt_ids(tokenizer, question_text(conversation, question), turns[start:])
    message = question_text(conversation, question)
    if shown:
        message = _transcript(conversation, start, len(turns)) + "\n" + message
    return prompt_ids(tokenizer, message)


def fit(tokenizer, conversation: Conversation, question: str, shown: int, max_tokens: int) -> tuple[list[int], int]:
    """The prompt with at most max_tokens ids and the turns it shows: the earliest of the `shown`
    latest turns are dropped until it fits (adapter_core.serving.decoding.fit_prompt's rule, which chats
    use as it is). A question that does not fit even alone is an error."""
    alone = prompt(tokenizer, conversation, question, 0)
    if len(alone) > max_tokens:
        raise ValueError(f"the question's prompt has {len(alone)} tokens, more than the {max_tokens} available "
                         f"(context limit minus the answer's room): {question!r}")
    if not conversation.named:
        ids, kept = fit_prompt(tokenizer, question_text(conversation, question),
                               conversation.turns[len(conversation.turns) - shown:], max_tokens)
        return ids, len(kept)
    ids = prompt(tokenizer, conversation, question, shown)
    if len(ids) <= max_tokens:
        return ids, shown
    dropped = fewest_dropped(shown, lambda n: len(prompt(tokenizer, conversation, question, shown - n)) <= max_tokens)
    return prompt(tokenizer, conversation, question, shown - dropped), shown - dropped


def _people(conversation: Conversation) -> str:
    """'the conversations between A and B', or 'my conversations with B' when A is me."""
    if conversation.me:
        others = [s for s in conversation.speakers if s != conversation.me]
        return f"my conversations with {_and(others)}" if others else "my conversations"
    return f"the conversations between {_and(conversation.speakers)}"


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _transcript(conversation: Conversation, start: int, stop: int) -> str:
    """Turns start..stop-1 as a transcript, each session under its number and date (a session cut
    in two keeps its header in both parts)."""
    intro = f"Transcript of {_people(conversation)}"
    intro += f" (I am {conversation.me})." if conversation.me else "."
    parts = [intro + "\n"]
    lines, sessions = turn_lines(conversation), conversation.turn_sessions
    for i in range(start, stop):
        s = sessions[i]
        if i == start or s != sessions[i - 1]:
            date = conversation.sessions[s].date
            parts.append(f"\nSession {s + 1}{', ' + date if date else ''}:\n")
        parts.append(lines[i])
    return "".join(parts)
