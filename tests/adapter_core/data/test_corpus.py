from adapter_core.data import corpus


def test_generic_text_is_there_offline_and_split():
    train, held_out = corpus.documents("train"), corpus.documents("eval")
    assert sum(map(len, train)) > 1_000_000  # characters of English prose
    assert sum(map(len, held_out)) > 20_000
    assert not set(train) & set(held_out)
    assert all(len(d) >= 300 for d in train)
