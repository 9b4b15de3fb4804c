import json

import pytest
import torch
from peft import PeftModel

from adapter_core import export_peft
from adapter_core.memory.export import servable_rank


def plain_copy(engine, make_tiny_lm, family):
    """The same base weights in a fresh, never-wrapped model, for PEFT to inject into."""
    base = make_tiny_lm(family, layers=engine.base_model.config.num_hidden_layers)
    own = {k.replace(".base_layer.", "."): v for k, v in engine.base_model.state_dict().items()
           if ".lora_" not in k and ".ctx_" not in k}
    base.load_state_dict(own)
    return base


@pytest.mark.parametrize("config", [
    dict(rank=4),  # padded to rank 8
    dict(rank=8, layers=(0, 2), normalization="svd"),  # some layers only
    dict(rank=4, target_modules=("o_proj",), normalization="frobenius", scale=0.7),
])
def test_peft_export_gives_the_same_logits(family, make_engine, make_tiny_lm, random_tokens, tmp_path, config):
    engine = make_engine(family, **config)
    state = engine.absorb(engine.empty_state(), [random_tokens(30)])
    folder = export_peft(engine, state, tmp_path / "peft")
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["r"] == servable_rank(engine.config.rank) == adapter_config["lora_alpha"]
    assert adapter_config["modules_to_save"] is None
    peft_model = PeftModel.from_pretrained(plain_copy(engine, make_tiny_lm, family), folder).eval()
    ids = torch.tensor([random_tokens(11)])
    ours = engine(ids, states=[state]).logits
    theirs = peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - engine(ids).logits).abs().max().item() > 1e-2  # the adapter is not a no-op


def test_export_uses_unfused_module_names(make_engine, random_tokens, tmp_path):
    from safetensors.torch import load_file
    engine = make_engine("llama")
    folder = export_peft(engine, engine.absorb(engine.empty_state(), [random_tokens(9)]), tmp_path)
    names = sorted(load_file(folder / "adapter_model.safetensors"))
    assert names[:2] == ["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
                         "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert len(names) == 3 * 2 * 2


@pytest.mark.parametrize("rank, servable", [(1, 8), (8, 8), (9, 16), (32, 32), (300, 320), (600, 600)])
def test_servable_rank(rank, servable):
    assert servable_rank(rank) == servable


def test_a_fine_tuned_states_own_pairs_export_as_the_same_logits(make_engine, make_tiny_lm, random_tokens, tmp_path):
    from tests.adapter_core.memory.test_finetune import random_pairs

    engine = make_engine("llama")
    state = random_pairs(engine, 5, rank=4)  # on the upper layer's modules; the others add nothing
    folder = export_peft(engine, state, tmp_path / "peft")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8  # rank 4, padded
    peft_model = PeftModel.from_pretrained(plain_copy(engine, make_tiny_lm, "llama"), folder).eval()
    ids = torch.tensor([random_tokens(11)])
    ours = engine(ids, states=[state]).logits
    assert (ours - peft_model(input_ids=ids).logits).abs().max().item() <= 1e-4
    assert (ours - engine(ids).logits).abs().max().item() > 1e-2
