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
    ("She went to a support group", ["the support group"], True),  # function words left out on both sides
    ("She went to the group about support", ["the support group"], False),  # content words stay in order
    ("Her mother", ["a gift for her mother"], False),  # the gold's content words must all be there
    ("He did.", ["he"], True),  # a gold of function words only is compared with them kept
    ("She did.", ["he"], False),
    ("No, she is not allergic", ["not allergic"], True),  # negations are content
    ("She is allergic", ["not allergic"], False),
    ("In June 2023", ["May 2023"], False),  # "may" is a month here, not a function word
    ("On June 7, 2023", ["7 May 2023"], False),
    ("It may be May 2023", ["May 2023"], True),
    ("The week after 9 June 2023", ["The week before 9 June 2023"], False),  # the order of dates counts
    ("the week before 9 June 2023", ["The week before 9 June 2023"], True),
])
def test_containment(prediction, golds, expected):
    assert contains_answer(prediction, golds) is expected


def test_token_f1_leaves_function_words_out_on_both_sides():
    assert token_f1("your cat is tobrik", ["Tobrik"]) == pytest.approx(2 / 3)  # "your", "is" do not count
    assert token_f1("plum tart", ["the plum tart"]) == 1.0
    assert token_f1("It was for her mother", ["a gift for her mother"]) == pytest.approx(2 / 3)  # gift missing
    assert token_f1("", ["x"]) == 0.0
    assert token_f1("he", ["he"]) == 1.0


def test_an_answer_of_function_words_only():
    # nothing left of the prediction: no match and no F1, not a division by zero
    assert token_f1("It was her.", ["Tobrik"]) == 0.0 and not contains_answer("It was her.", ["Tobrik"])
    assert token_f1("anything", ["The"]) == 0.0  # a gold that normalises to nothing matches nothing
    assert token_f1("May 2023", ["June 2023"]) == 0.5
