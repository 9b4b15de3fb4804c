"""GenerativeAdapterModel.loss: the training loss the engine computes itself."""

import random

import pytest
import torch

from adapter_core.training.objectives import DataRecipe, DataSource
from adapter_core.memory.windows import TrainingBatch, pack_training_batch, pack_windows


def source(tokenizer, **recipe):
    options = dict(batch_size=2, qa_facts=(1, 2), qa_lengths=(60,)) | recipe
    return DataSource(tokenizer, DataRecipe(**options), window=64, seed=11)


def test_a_tiny_model_overfits_a_fixed_batch(make_text_engine, tiny_tokenizer):
    engine = make_text_engine()
    _, batch = source(tiny_tokenizer, mix={"qa": 1.0}).batch(0)
    optimizer = torch.optim.Adam(engine.generator_parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss, labelled = engine.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert labelled > 0
    assert losses[-1] < losses[0] / 2, losses
    assert all(p.grad is None for p in engine.base_model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("objective", ["qa", "reconstruction", "completion"])
def test_queries_in_their_own_pass_give_the_loss_and_gradients_of_one_pass(objective, make_text_engine,
                                                                           tiny_tokenizer):
    engine = make_text_engine(live=True)
    data = source(tiny_tokenizer, mix={objective: 1.0}, batch_size=3)
    rng = random.Random(3)
    per_user = [getattr(data, f"_{objective}")(rng) for _ in range(3)]
    two_pass, _ = engine.loss(pack_training_batch(per_user, tiny_tokenizer.pad_token_id))
    grads = torch.autograd.grad(two_pass, engine.generator_parameters())
    # The reference: every window, queries included, in a single memory pass (the queries' write
    # mask is 0, so they read the memory of the windows before them and write nothing).
    reference, _ = engine.loss(TrainingBatch(pack_windows(per_user, tiny_tokenizer.pad_token_id), None))
    reference_grads = torch.autograd.grad(reference, engine.generator_parameters())
    torch.testing.assert_close(two_pass, reference, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, reference_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads)

