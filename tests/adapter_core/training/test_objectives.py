import random

import torch

from adapter_core.training.objectives import DataRecipe, DataSource, qa_windows
from adapter_core.memory.windows import IGNORE


def source(tokenizer, **recipe):
    options = dict(batch_size=2, qa_facts=(1, 2), qa_lengths=(60,)) | recipe
    return DataSource(tokenizer, DataRecipe(**options), window=64, seed=11)


def test_batches_depend_only_on_seed_and_step(tiny_tokenizer):
    data = source(tiny_tokenizer, mix={"qa": 1.0})
    a, b, c = data.batch(5)[1], data.batch(5)[1], data.batch(6)[1]
    assert torch.equal(a.memory.input_ids, b.memory.input_ids) and torch.equal(a.queries.labels, b.queries.labels)
    assert a.queries.input_ids.shape != c.queries.input_ids.shape or not torch.equal(a.queries.input_ids,
                                                                                      c.queries.input_ids)


def test_mix_decides_the_objectives(tiny_tokenizer):
    data = source(tiny_tokenizer, mix={"completion": 1.0, "qa": 3.0})
    drawn = [data.objective_for(step) for step in range(400)]
    assert set(drawn) == {"completion", "qa"}
    assert 0.65 < drawn.count("qa") / 400 < 0.85


def test_qa_loss_is_on_answer_tokens_only_and_queries_do_not_write_memory(tiny_tokenizer):
    windows = qa_windows(tiny_tokenizer, 64, "User: my cat is Tobrik.\n" * 5, [], [("Cat?", "Tobrik")])
    history, query = windows[:-1], windows[-1]
    assert len(history) == 2 and all(w.labels is None and w.writes_memory for w in history)
    labelled = [t for t in query.labels if t != IGNORE]
    assert tiny_tokenizer.decode(labelled) == "Tobrik<|im_end|>"
    assert not query.writes_memory


def test_reconstruction_repeats_a_span_of_memory_after_a_cue(tiny_tokenizer):
    data = source(tiny_tokenizer, mix={"reconstruction": 1.0}, cue_tokens=4)
    example = data._reconstruction(random.Random(0))
    memory, query = example[:-1], example[-1]
    span = query.ids
    assert any(span == w.ids[i:i + len(span)] for w in memory for i in range(len(w.ids)))
    assert query.labels[:4] == [IGNORE] * 4 and query.labels[4:] == span[4:]
