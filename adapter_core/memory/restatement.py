"""Recall chats: what the fine-tuning learns from besides the stored chat itself.

Next-token loss on "User: My hamster answers to Drousk." raises the likelihood of the name after
those words, but a question in the chat format rarely brings it out. So, from each statement the
user made about themselves, the fine-tuning also trains on chats in the format a question comes
in (the model's own chat template, the app's system prompt) where the assistant says it back:

    statement      "My little hamster answers to Drousk."
      │ second_person (first person -> second, by rule: no model can misspell the value)
      ▼
    restatement    "Your little hamster answers to Drousk."
      │ asked with a general question, and with a question the base model writes itself
      ▼                (few-shot; kept only when its answer is copied from the statement)
    exchange       user "What did I tell you?" / assistant "You told me: Your little ..."
                   / user "What is my little hamster called?" / assistant "Drousk. You told me: ..."
      │ packed, after the system prompt, into chats of a training window each
      ▼
    chat           system / exchange / exchange / ...

Nothing here sees a question or answer of the evaluation set: the general questions are written
here, the specific ones by the base model from the user's own statement.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..data.conversation import LINE_STARTS, SYSTEM_PROMPT

GENERAL_QUESTIONS = ("What did I tell you?", "What do you remember about me?", "Remind me what I said.",
                     "What do you know about me?")
"""Asked before a restatement in every recall chat (one per statement, seeded)."""

QUESTION_SHOTS = (
    ("My brother is called Tom.", "What is my brother called?", "Tom"),
    ("We moved to Lisbon last year.", "Where did we move to last year?", "Lisbon"),
    ("The food I like most is ramen.", "Which food do I like most?", "ramen"),
    ("For work I drive a blue van.", "What do I drive for work?", "a blue van"),
)
"""The examples the base model writes its questions after: (statement, question, answer)."""

_SWAPS = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "i'm": "you're",
          "i've": "you've", "i'll": "you'll", "i'd": "you'd", "am": "are", "we": "you", "us": "you",
          "our": "your", "ours": "yours", "ourselves": "yourselves", "we're": "you're", "we've": "you've",
          "we'll": "you'll", "we'd": "you'd"}
_FIRST_PERSON = {"i", "me", "my", "mine", "myself", "i'm", "i've", "i'll", "i'd", "we", "us", "our", "ours",
                 "we're", "we've"}
_SECOND_PERSON = {"you", "your", "yours", "yourself", "yourselves", "you're", "you've", "you'll", "you'd"}
_LETTER = r"[^\W\d_]"
_WORD = re.compile(rf"(?<!{_LETTER}){_LETTER}+(?:['’]{_LETTER}+)?(?!{_LETTER})")
"""A word of letters of any alphabet, with one apostrophe at most ("I'm"); never part of a longer word ("Iñaki")."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _key(word: str) -> str:
    return word.lower().replace("’", "'")


def statements(text: str, longest: int = 300) -> list[str]:
    """The sentences of the user's lines in an absorbed text that say something about the user:
    first person, not a question, not addressed to the assistant ("you"), at most `longest` characters."""
    found = []
    for line in text.splitlines():
        if not line.startswith(LINE_STARTS["user"]):
            continue
        for sentence in _SENTENCE_END.split(line[len(LINE_STARTS["user"]):].strip()):
            words = {_key(w) for w in _WORD.findall(sentence) if _is_pronoun(w)}
            if (sentence and not sentence.endswith("?") and len(sentence) <= longest
                    and words & _FIRST_PERSON and not words & _SECOND_PERSON):
                found.append(sentence)
    return found


def _is_pronoun(word: str) -> bool:
    """Whether a word is used as a pronoun: lower case, or "I" and its contractions, or capitalised
    (the start of a sentence); not "US" or "AM"."""
    return word.islower() or _key(word) in ("i", "i'm", "i've", "i'll", "i'd") or word == word.capitalize()


def second_person(sentence: str, end: bool = True) -> str:
    """The sentence said back to its speaker: "My cat is Tom." -> "Your cat is Tom." (capitalised
    at its start only; every other word, names and values, as it was). end: add a full stop if it
    has no closing punctuation."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = _SWAPS.get(_key(word))
        if new is None or not _is_pronoun(word) or (word[0].isupper() and match.start() > 0 and _key(word) not in
                                                      ("i", "i'm", "i've", "i'll", "i'd")):
            return word  # "US", or a capitalised "My" inside a title: not the speaker
        return new.capitalize() if match.start() == 0 else new
    said = _WORD.sub(swap, re.sub(r"\b(I|we) was\b", lambda m: f"{m.group(1)} were", sentence.strip()))
    return said if not end or said.endswith((".", "!", '"', "'", "”")) else said + "."


@dataclass(frozen=True)
class RecallQuestion:
    """A question the base model wrote about a statement, and its answer copied from the statement."""

    question: str
    answer: str


def question_prompt(statement: str) -> str:
    """Few-shot text after which the base model writes a question about the statement (completed
    as plain text: "... Question: <it writes> / Answer: <it copies>")."""
    shots = "".join(f"Statement: {s}\nQuestion: {q}\nAnswer: {a}\n\n" for s, q, a in QUESTION_SHOTS)
    return f"{shots}Statement: {statement}\nQuestion:"


def parse_question(statement: str, written: str) -> RecallQuestion | None:
    """The model's completion of question_prompt as a question, or None where it is not usable:
    no question mark, or an answer that is not copied from the statement or is given away in the question."""
    match = re.match(r"\s*([^\n]+\?)\s*\nAnswer:\s*([^\n]+)", written)
    if match is None:
        return None
    question, answer = match.group(1).strip(), match.group(2).strip().rstrip(".")
    copied = re.search(rf"\b{re.escape(answer)}\b", statement, re.IGNORECASE) if answer else None
    if copied is None or answer.lower() in question.lower() or len(question) > 150:
        return None
    return RecallQuestion(question, copied.group(0))


RECALLS = ("none", "restate", "questions", "both")
"""Which exchanges a statement gets: none; `restate`, a general question answered with the
restatement; `questions`, the base model's own question about it (where it wrote a usable one)
answered with the copied answer, then the restatement; `both`."""


def recall_exchanges(said: Sequence[str], questions: Sequence[RecallQuestion | None], seed: int,
                     kinds: str = "both") -> list[list[dict]]:
    """Per statement, the messages that ask for it and say it back (kinds: one of RECALLS)."""
    if kinds not in RECALLS:
        raise ValueError(f"kinds must be one of {RECALLS}, got {kinds!r}")
    gen = random.Random(seed)
    exchanges = []
    for statement, asked in zip(said, questions):
        told = f"You told me: {second_person(statement)}"
        general = gen.choice(GENERAL_QUESTIONS)  # drawn for every statement: the same draws whatever kinds says
        messages = []
        if kinds in ("restate", "both"):
            messages += [{"role": "user", "content": general}, {"role": "assistant", "content": told}]
        if asked is not None and kinds in ("questions", "both"):
            said_back = second_person(asked.answer, end=False)  # "my brother" -> "your brother"
            answer = said_back[0].upper() + said_back[1:]
            messages += [{"role": "user", "content": asked.question},
                         {"role": "assistant", "content": f"{answer}. {told}"}]
        if messages:
            exchanges.append(messages)
    return exchanges


def recall_chats(exchanges: Sequence[list[dict]], fits: Callable[[list[dict]], bool]) -> list[list[dict]]:
    """The exchanges in as few chats as `fits` allows, each opened by the app's system prompt (an
    exchange too long for a chat of its own gets one all the same)."""
    chats: list[list[dict]] = []
    for messages in exchanges:
        if chats and fits(chats[-1] + messages):
            chats[-1] += messages
        else:
            chats.append([{"role": "system", "content": SYSTEM_PROMPT}, *messages])
    return chats


def chat_tokens(tokenizer, chat: list[dict]) -> tuple[list[int], list[bool]]:
    """A chat's ids in the model's chat template, and whether each is the assistant's (what the
    loss counts): each assistant message's tokens, found as what it adds to the chat before it."""
    ids: list[int] = []
    counted: list[bool] = []
    def template(messages: list[dict], ask: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=ask, tokenize=True,
                                                  return_dict=True)["input_ids"])

    for k, message in enumerate(chat):
        head = template(chat[:k], ask=True) if message["role"] == "assistant" else ids  # "<|im_start|>assistant\n"
        upto = template(chat[:k + 1], ask=False)
        if head[:len(ids)] != ids or upto[:len(head)] != head:  # a template that rewrites earlier text
            return ids, counted
        counted += [False] * (len(head) - len(ids)) + [message["role"] == "assistant"] * (len(upto) - len(head))
        ids = upto
    return ids, counted


Writer = Callable[[list[str]], list[str]]
"""Completes each few-shot prompt (the base model's greedy continuation)."""


def written_questions(said: Sequence[str], write: Writer | None) -> list[RecallQuestion | None]:
    """The base model's question for each statement (None: none usable, or no writer)."""
    if write is None or not said:
        return [None] * len(said)
    return [parse_question(s, w) for s, w in zip(said, write([question_prompt(s) for s in said]))]
