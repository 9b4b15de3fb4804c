import pytest

from adapter_core.memory.windows import IGNORE, Window, pack_training_batch, pack_windows


def test_the_last_window_always_lands_in_the_last_row():
    packed = pack_windows([[Window([5, 6]), Window([7], writes_memory=False)],
                           [Window([1]), Window([2]), Window([3, 4], labels=[IGNORE, 4])]])
    assert packed.input_ids.shape == (6, 2)
    assert packed.input_ids[2].tolist() == [7, 0] and packed.write_mask[2].tolist() == [0, 0]
    assert packed.write_mask[1].tolist() == [0, 0] and packed.attention_mask[1].tolist() == [1, 0]  # empty row
    assert packed.labels[5].tolist() == [IGNORE, 4]


def test_queries_get_their_own_rows_padded_to_the_longest_query():
    history = [Window(list(range(10, 18))), Window(list(range(20, 28)))]
    alice = history + [Window([7, 8], labels=[IGNORE, 8], writes_memory=False),
                       Window([9], labels=[9], writes_memory=False)]
    bob = [Window([1, 2, 3])] + [Window([4, 5, 6], labels=[IGNORE, 5, 6], writes_memory=False)]
    batch = pack_training_batch([alice, bob])
    assert batch.memory.input_ids.shape == (4, 8)  # 2 users x 2 memory windows, no query among them
    assert batch.memory.write_mask.sum() == 8 + 8 + 3
    q = batch.queries
    assert q.input_ids.shape == (3, 3) and q.user.tolist() == [0, 0, 1]
    assert q.input_ids[0].tolist() == [7, 8, 0] and q.attention_mask[0].tolist() == [1, 1, 0]
    assert q.labels[2].tolist() == [IGNORE, 5, 6]
    assert batch.tokens == 8 + 8 + 3 + 2 + 1 + 3


def test_a_user_without_history_reads_an_empty_memory_and_order_is_checked():
    batch = pack_training_batch([[Window([4, 5], writes_memory=False)], [Window([1, 2]), Window([3])]])
    assert batch.memory.write_mask[:2].sum() == 0  # user 0's memory rows write nothing
    assert batch.queries.user.tolist() == [0]
    assert pack_training_batch([[Window([1, 2])]]).queries is None
    with pytest.raises(ValueError, match="writes memory after a read-only window"):
        pack_training_batch([[Window([1], writes_memory=False), Window([2])]])
    with pytest.raises(ValueError, match="labels"):
        pack_training_batch([[Window([1]), Window([2, 3], labels=[3], writes_memory=False)]])
