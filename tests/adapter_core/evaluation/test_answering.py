"""One pass over each prompt gives the same answers and gold NLLs as the old way: reply() for the
answer, then a second forward over prompt + gold for the NLL."""

import pytest
import torch
import torch.nn.functional as F

from adapter_core.data.conversation import left_pad
from adapter_core.serving.decoding import ReplyRequest, reply
from adapter_core.evaluation.answering import answer
from adapter_core.serving.sampling import SamplingConfig

from tests.conftest import tiny_text_engine

PROMPTS = ["What is my cat called?", "Where do I live? Tell me in a few words, please.", "Hi",
           "A much longer prompt: " + "the quick brown fox jumps over the lazy dog. " * 6]
GOLDS = ["Tobrik", "Porto Velho, Brazil", "x", "a lighthouse keeper who collects lost letters"]


@pytest.fixture(scope="module")
def case(tiny_tokenizer):
    engine = tiny_text_engine(tiny_tokenizer, seed=4, live=True)  # random B: adapters change the answers
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for p in PROMPTS]
    golds = [tok(g, add_special_tokens=False)["input_ids"] for g in GOLDS]
    with torch.no_grad():
        memory = engine.absorb(engine.empty_state(), "User: My cat is called Tobrik.\nAssistant: Lovely!\n")
    states = [None, memory, memory, None]
    return engine, prompts, golds, states


def old_nlls(engine, prompts, golds, states):
    ids, mask = left_pad([p + g for p, g in zip(prompts, golds)], engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = engine(ids, attention_mask=mask, states=states).logits.float()
    return [F.cross_entropy(logits[i, -len(g) - 1:-1], ids[i, -len(g):]).item() for i, g in enumerate(golds)]


def test_same_answers_and_nll_as_reply_plus_a_second_forward(case):
    engine, prompts, golds, states = case
    answers = answer(engine, prompts, golds, states, max_new_tokens=8)
    replies = reply(engine, [ReplyRequest(p, s, SamplingConfig.greedy(8)) for p, s in zip(prompts, states)])
    assert [a.text for a in answers] == [r.text for r in replies]
    assert any(r.finish == "length" for r in replies) and len({a.text for a in answers}) > 1
    assert [a.nll for a in answers] == pytest.approx(old_nlls(engine, prompts, golds, states), abs=1e-4)
    # one row at a time gives the same: padding does not leak into the answers
    alone = [answer(engine, [p], [g], [s], 8)[0] for p, g, s in zip(prompts, golds, states)]
    assert [a.text for a in alone] == [a.text for a in answers]
    assert [a.nll for a in alone] == pytest.approx([a.nll for a in answers], abs=1e-4)


def test_each_prompt_goes_through_the_model_once(case, monkeypatch):
    engine, prompts, golds, states = case
    widths = []
    forward = engine.base_model.forward

    def counting(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.base_model, "forward", counting)
    answer(engine, prompts, golds, states, max_new_tokens=5)
    longest_prompt, longest_gold = max(map(len, prompts)), max(map(len, golds))
    assert widths[0] == longest_prompt + longest_gold - 1  # prompts and golds in one pass
    # then one token a step (on the CPU the lean decode step, which does not go through forward)
    assert widths[1:] == [1] * len(widths[1:]) and len(widths) - 1 <= 4


def test_a_gold_of_one_token_and_an_empty_gold(case):
    engine, prompts, golds, states = case
    one = [g[:1] for g in golds]  # no gold column after the prompts: nothing to cut from the cache
    answers = answer(engine, prompts, one, states, 3)
    assert [a.nll for a in answers] == pytest.approx(old_nlls(engine, prompts, one, states), abs=1e-4)
    assert [a.text for a in answers] == [a.text for a in answer(engine, prompts, golds, states, 3)]
    with pytest.raises(ValueError, match="at least one token"):
        answer(engine, prompts[:1], [[]], [None], 3)
