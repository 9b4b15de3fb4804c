import pytest

from adapter_core.evaluation.metrics import contains_answer, normalize_answer, token_f1


def test_normalisation():
    assert normalize_answer("  The Plum-Tart!  ") == "plum tart"
    assert normalize_answer("Ｔｏｂｒｉｋ") == "tobrik"  # NFKC folds full-width letters


@pytest.mark.parametrize("prediction, golds, expected", [
    ("Your cat is Tobrik.", ["Tobrik"], True),
    ("Tobriks are nice", ["Tobrik"], False),  # whole words only
    ("It is 4821", ["4812", "4821"], True),
    ("no idea", ["Tobrik"], False),
    ("anything", [""], False),
])
def test_containment(prediction, golds, expected):
    assert contains_answer(prediction, golds) is expected


def test_token_f1():
    assert token_f1("your cat is tobrik", ["Tobrik"]) == pytest.approx(0.4)
    assert token_f1("plum tart", ["the plum tart"]) == 1.0
    assert token_f1("", ["x"]) == 0.0
