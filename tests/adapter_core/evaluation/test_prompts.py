from pathlib import Path

import pytest
import torch

from adapter_core.data.conversation import history_text
from adapter_core.data.dataset import read_jsonl
from adapter_core.evaluation import prompts
from adapter_core.evaluation.prompts import SHORT_ANSWER
from adapter_core.evaluation.runner import MODES, EvalOptions, _prepare, swap_partners
from adapter_core.memory.finetune import FinetuneCompressor, FinetuneConfig

DATA = Path(__file__).parents[1] / "data"
CAROLINE, JOANNA = read_jsonl(DATA / "two_speakers.jsonl")
CHATS = list(read_jsonl(DATA / "three_examples.jsonl"))


def text(tok, ids) -> str:
    return tok.decode(ids)


def test_a_conversation_between_people_is_a_quoted_transcript_with_names_and_dates():
    memory = prompts.memory_text(CAROLINE, len(CAROLINE.turns))
    assert memory.startswith("Transcript of the conversations between Caroline and Melanie.\n")
    assert "\nSession 1, 1:56 pm on 8 May, 2023:\nCaroline said: \"Hey Mel! I went to an LGBTQ" in memory
    assert "\nSession 3, 2023-06-09 10:15:\n" in memory
    assert memory.count('Melanie said: "') == 5 and "User:" not in memory
    mine = prompts.memory_text(JOANNA, len(JOANNA.turns))
    assert mine.startswith("Transcript of my conversations with Nate (I am Joanna).\n")
    assert "\nSession 2:\nNate said: \"I adopted" in mine  # a session without a date
    # a chat keeps the format training and the app use
    assert prompts.memory_text(CHATS[1], 3) == history_text(CHATS[1].turns[:3])


def test_full_history_shows_the_transcript_then_asks_about_it(tiny_tokenizer):
    tok = tiny_tokenizer
    q = CAROLINE.questions[0].question
    full = text(tok, prompts.prompt(tok, CAROLINE, q, len(CAROLINE.turns)))
    transcript = prompts.memory_text(CAROLINE, len(CAROLINE.turns))
    asked = f"Question about the conversations between Caroline and Melanie: {q} {SHORT_ANSWER}"
    assert f"<|im_start|>user\n{transcript}\n{asked}<|im_end|>\n<|im_start|>assistant\n" in full
    assert full.count("<|im_start|>user") == 1  # one message: the model is not one of the speakers
    recent = text(tok, prompts.prompt(tok, CAROLINE, q, 2))
    assert "Session 3, 2023-06-09 10:15:\nMelanie said: \"Lovely." in recent and "Session 1" not in recent
    alone = text(tok, prompts.prompt(tok, CAROLINE, q, 0))
    assert f"<|im_start|>user\n{asked}<|im_end|>" in alone and "Session" not in alone


@pytest.mark.parametrize("conversation", [CAROLINE, CHATS[1]], ids=["transcript", "chat"])
def test_fitting_drops_the_earliest_turns(tiny_tokenizer, conversation):
    tok = tiny_tokenizer
    q = conversation.questions[0].question
    n = len(conversation.turns)
    whole = len(prompts.prompt(tok, conversation, q, n))
    ids, shown = prompts.fit(tok, conversation, q, n, whole)
    assert shown == n and len(ids) == whole
    ids, shown = prompts.fit(tok, conversation, q, n, whole - 1)
    assert 0 < shown < n and len(ids) <= whole - 1
    assert len(prompts.prompt(tok, conversation, q, shown + 1)) > whole - 1  # the fewest dropped
    alone = len(prompts.prompt(tok, conversation, q, 0))
    assert prompts.fit(tok, conversation, q, n, alone)[1] == 0
    with pytest.raises(ValueError, match="more than the"):
        prompts.fit(tok, conversation, q, n, alone - 1)


def test_every_mode_asks_for_a_short_answer_the_same_way(make_text_engine):
    engine = make_text_engine()
    tok = engine.tokenizer
    conversations = [CAROLINE, JOANNA, *CHATS]
    compressor = FinetuneCompressor(engine, FinetuneConfig(steps=1))
    asks = _prepare(engine, conversations, swap_partners(conversations), EvalOptions(modes=MODES, recent_turns=2),
                    1024, compressor)
    assert len(asks) == len(MODES) * sum(len(c.questions) for c in conversations)
    for ask in asks:
        asked = prompts.question_text(ask.conversation, ask.conversation.questions[ask.index].question)
        shown = text(tok, ask.prompt)
        assert asked.endswith(f"? {SHORT_ANSWER}")
        assert shown.endswith(f"{asked}<|im_end|>\n<|im_start|>assistant\n") and shown.count(SHORT_ANSWER) == 1
        assert ("Transcript of" in shown) == (ask.conversation.named and ask.mode in ("full_history",
                                                                                      "adapter_recent"))


def test_adapter_modes_absorb_the_transcript(make_text_engine):
    engine = make_text_engine()
    asks = _prepare(engine, [CAROLINE], [JOANNA], EvalOptions(modes=("adapter", "adapter_recent"), recent_turns=3),
                    limit=1024)
    n = len(CAROLINE.turns)
    for mode, absorbed in (("adapter", n), ("adapter_recent", n - 3)):
        state = next(a.state for a in asks if a.mode == mode)
        expected = engine.absorb(engine.empty_state(), prompts.memory_text(CAROLINE, absorbed))
        assert state.tokens == expected.tokens > 0
        assert all(torch.equal(state.sums[k], expected.sums[k]) for k in state.sums)
    recent = next(a for a in asks if a.mode == "adapter_recent")
    shown = engine.tokenizer.decode(recent.prompt)
    assert "Session 3" in shown and "Luna ran around" in shown and "sunrise" not in shown
