import random

import pytest
import torch

from adapter_core.training.objectives import DataRecipe, DataSource, batch_loss, qa_windows
from adapter_core.windows import IGNORE, pack_training_batch, pack_windows


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
    import random
    example = data._reconstruction(random.Random(0))
    memory, query = example[:-1], example[-1]
    span = query.ids
    assert any(span == w.ids[i:i + len(span)] for w in memory for i in range(len(w.ids)))
    assert query.labels[:4] == [IGNORE] * 4 and query.labels[4:] == span[4:]


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


def one_pass_loss(engine, per_user, pad_id):
    """The reference: every window, queries included, in a single memory pass."""
    packed = pack_windows(per_user, pad_id)
    r = engine.config.rank
    prior = {name: torch.zeros(packed.users, r, r) for name in engine.adapted}
    with engine.memory_pass(prior, packed.rows, packed.sum_mask):
        hidden = engine.base_model.get_decoder()(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                                 use_cache=False).last_hidden_state
    targets = packed.labels[:, 1:]
    selected = targets != IGNORE
    logits = engine.base_model.get_output_embeddings()(hidden[:, :-1][selected])
    return torch.nn.functional.cross_entropy(logits.float(), targets[selected])


@pytest.mark.parametrize("objective", ["qa", "reconstruction", "completion"])
def test_queries_in_their_own_pass_give_the_loss_and_gradients_of_one_pass(objective, make_text_engine,
                                                                           tiny_tokenizer):
    engine = make_text_engine(live=True)
    data = source(tiny_tokenizer, mix={objective: 1.0}, batch_size=3)
    rng = random.Random(3)
    per_user = [getattr(data, f"_{objective}")(rng) for _ in range(3)]
    two_pass, _ = batch_loss(engine, pack_training_batch(per_user, tiny_tokenizer.pad_token_id))
    grads = torch.autograd.grad(two_pass, engine.generator_parameters())
    reference = one_pass_loss(engine, per_user, tiny_tokenizer.pad_token_id)
    reference_grads = torch.autograd.grad(reference, engine.generator_parameters())
    torch.testing.assert_close(two_pass, reference, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, reference_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads)
