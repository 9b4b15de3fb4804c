import torch

from adapter_core.training.objectives import DataRecipe, DataSource, batch_loss, qa_windows
from adapter_core.windows import IGNORE, Window, pack_windows


def source(tokenizer, **recipe):
    options = dict(batch_size=2, qa_facts=(1, 2), qa_lengths=(60,)) | recipe
    return DataSource(tokenizer, DataRecipe(**options), window=64, seed=11)


def test_batches_depend_only_on_seed_and_step(tiny_tokenizer):
    data = source(tiny_tokenizer, mix={"qa": 1.0})
    a, b, c = data.batch(5)[1], data.batch(5)[1], data.batch(6)[1]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert a.input_ids.shape != c.input_ids.shape or not torch.equal(a.input_ids, c.input_ids)


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
    import random
    example = data._reconstruction(random.Random(0))
    memory, query = example[:-1], example[-1]
    span = query.ids
    assert any(span == w.ids[i:i + len(span)] for w in memory for i in range(len(w.ids)))
    assert query.labels[:4] == [IGNORE] * 4 and query.labels[4:] == span[4:]


def test_the_query_always_lands_in_the_last_row():
    packed = pack_windows([[Window([5, 6]), Window([7], writes_memory=False)],
                           [Window([1]), Window([2]), Window([3, 4], labels=[IGNORE, 4])]])
    assert packed.input_ids.shape == (6, 2)
    assert packed.input_ids[2].tolist() == [7, 0] and packed.sum_mask[2].tolist() == [0, 0]
    assert packed.sum_mask[1].tolist() == [0, 0] and packed.attention_mask[1].tolist() == [1, 0]  # empty row
    assert packed.labels[5].tolist() == [IGNORE, 4]


def test_a_tiny_model_overfits_a_fixed_batch(make_text_engine, tiny_tokenizer):
    engine = make_text_engine()
    _, batch = source(tiny_tokenizer, mix={"qa": 1.0}).batch(0)
    optimizer = torch.optim.Adam(engine.generator_parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss, labelled = batch_loss(engine, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert labelled > 0
    assert losses[-1] < losses[0] / 2, losses
    assert all(p.grad is None for p in engine.base_model.parameters() if not p.requires_grad)
