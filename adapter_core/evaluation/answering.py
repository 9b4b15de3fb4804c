"""Greedy answers and the gold answer's NLL from one pass over each prompt.

Scoring the gold answer (teacher-forced) and generating the model's own answer both start with
the prompt; for a full-history question that is thousands of tokens, most of the cost. So one
forward runs over every row's prompt followed by its gold answer: its logits give the gold's NLL
and the first generated token, its KV cache, cut back to the prompt, is where greedy decoding
goes on. The batch is laid out so that the prompts end in the same column:

    [pad .. pad prompt][gold[:-1] pad .. pad]      (N, T + G) ids, one row per question
     <------ T ------>  <------ G ------->          G = longest gold - 1: its last token is never fed

Column T - 1 + j predicts gold token j (column T - 1, the prompt's last token, also predicts the
first answer token); causal attention keeps the prompt's keys and values free of the gold, so
the cache's first T columns are the prompt's, and a DecodeBatch goes on from it (join_prefilled)
with SamplingConfig.greedy, as reply() would (tested: same answers, same NLL as reply() and a
separate forward over prompt + gold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..data.conversation import left_pad
from ..serving.decoding import DecodeBatch, ReplyRequest
from ..memory.model import GenerativeAdapterModel
from ..serving.sampling import SamplingConfig
from ..memory.state import AdapterState


@dataclass(frozen=True)
class Answer:
    text: str
    """The greedy answer, special tokens skipped, stripped."""
    nll: float
    """Mean negative log-likelihood per token of the gold answer as the reply."""


@torch.no_grad()
def answer(engine: GenerativeAdapterModel, prompts: Sequence[Sequence[int]], golds: Sequence[Sequence[int]],
           states: Sequence[AdapterState | None], max_new_tokens: int) -> list[Answer]:
    """Each row's greedy answer to its prompt, adapted by its state, and the NLL of its gold ids."""
    tok, device = engine.tokenizer, engine.device
    if any(not g for g in golds):
        raise ValueError("every gold answer needs at least one token")
    fed = [list(g[:-1]) for g in golds]
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)  # (N, T)
    width = max(map(len, fed))  # G
    gold_ids = torch.full((len(fed), width), tok.pad_token_id, dtype=torch.long)  # (N, G)
    gold_mask = torch.zeros((len(fed), width), dtype=torch.long)
    for i, g in enumerate(fed):
        gold_ids[i, :len(g)] = torch.tensor(g, dtype=torch.long)
        gold_mask[i, :len(g)] = 1
    ids = torch.cat([prompt_ids, gold_ids], 1).to(device)  # (N, T + G)
    mask = torch.cat([prompt_mask, gold_mask], 1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # each row counts its own positions
    cache = DynamicCache()
    with engine.adapters(states):
        logits = engine.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                   use_cache=True, logits_to_keep=width + 1).logits.float()  # (N, G + 1, V)
    nlls = [F.cross_entropy(logits[i, :len(g)], torch.tensor(list(g), device=logits.device)).item()
            for i, g in enumerate(golds)]
    if width:  # back to the prompts' T columns (in older transformers, crop(0) kept none)
        cache.crop(-width)
    greedy = SamplingConfig.greedy(max_new_tokens)
    batch = DecodeBatch(engine)
    rows = batch.join_prefilled([ReplyRequest(p, s, greedy) for p, s in zip(prompts, states)], cache,
                                mask[:, :prompt_ids.shape[1]], logits[:, 0])
    while batch.rows:  # rows that end leave, so long prompts are not attended to for nothing
        batch.leave([row for row in batch.rows if row.finish])
        if batch.rows:
            batch.step()
    return [Answer(tok.decode(row.tokens, skip_special_tokens=True).strip(), nll) for row, nll in zip(rows, nlls)]
