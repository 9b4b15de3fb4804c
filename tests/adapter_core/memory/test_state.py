import pytest
import torch
from safetensors.torch import save

from adapter_core import AdapterState, StateError
from adapter_core.memory.state import _digest


@pytest.fixture
def state(make_engine, random_tokens):
    engine = make_engine("llama")
    s = engine.absorb(engine.empty_state(), [random_tokens(19)])
    s.extra["cursor"] = "42"
    return s


def test_round_trip_keeps_everything(state, tmp_path):
    path = tmp_path / "state.safetensors"
    state.save(path)
    loaded = AdapterState.load(path, state.generator_id, state.base_model_id)
    assert (loaded.tokens, loaded.windows, loaded.extra) == (19, 3, {"cursor": "42"})
    assert set(loaded.sums) == set(state.sums)
    for name in state.sums:
        assert torch.equal(loaded.sums[name], state.sums[name])
        assert loaded.sums[name].dtype == torch.float32


def test_a_state_saved_when_windows_were_called_chunks_still_loads(state):
    # What the code wrote before the rename: the same file with the window count under "chunks".
    tensors = {name: s.contiguous() for name, s in state.sums.items()}
    metadata = {("chunks" if k == "windows" else k): v for k, v in state._metadata().items()}
    metadata["sha256"] = _digest(tensors, metadata)
    loaded = AdapterState.from_bytes(save(tensors, metadata=metadata), state.generator_id, state.base_model_id)
    assert (loaded.tokens, loaded.windows, loaded.extra) == (19, 3, {"cursor": "42"})
    assert b'"windows":"3"' in loaded.to_bytes()  # and is saved again under the new name


def test_a_flipped_tensor_byte_is_detected(state):
    data = bytearray(state.to_bytes())
    data[-3] ^= 0x40  # inside the last tensor's payload
    with pytest.raises(StateError, match="failed its checksum"):
        AdapterState.from_bytes(bytes(data))


def test_edited_metadata_is_detected(state):
    data = state.to_bytes()
    edited = data.replace(b'"tokens":"19"', b'"tokens":"91"')
    assert edited != data and len(edited) == len(data)
    with pytest.raises(StateError, match="failed its checksum"):
        AdapterState.from_bytes(edited)


@pytest.mark.parametrize("garbage", [b"", b"12345678", b"not a safetensors file at all" * 10])
def test_garbage_is_refused(garbage):
    with pytest.raises(StateError, match="not a readable adapter state"):
        AdapterState.from_bytes(garbage)


def test_a_plain_safetensors_file_is_not_a_state():
    with pytest.raises(StateError, match="not an adapter state"):
        AdapterState.from_bytes(save({"x": torch.zeros(2)}, metadata={"format": "pt"}))


def test_state_for_another_generator_or_model_is_refused(state):
    data = state.to_bytes()
    with pytest.raises(StateError, match="not by the loaded generator 'gen-other'"):
        AdapterState.from_bytes(data, generator_id="gen-other", base_model_id=state.base_model_id)
    with pytest.raises(StateError, match="made for base model 'tiny-llama', not 'other-model'"):
        AdapterState.from_bytes(data, generator_id=state.generator_id, base_model_id="other-model")


def test_size_is_reported(state):
    # 3 layers x 2 modules x (4 x 4) fp32
    assert state.nbytes() == 3 * 2 * 16 * 4
