import pytest

from adapter_core.evaluation.dates import PartialDate, date_match, dates_in


@pytest.mark.parametrize("text, dates", [
    ("She went on 7 May 2023.", [(2023, 5, 7)]),
    ("May 7th, 2023", [(2023, 5, 7)]),
    ("the 7th of May", [(None, 5, 7)]),
    ("1:56 pm on 8 May, 2023", [(2023, 5, 8)]),  # the time's numbers are not a day
    ("2023-05-07T13:56", [(2023, 5, 7)]),
    ("Sept. 3rd, 1999", [(1999, 9, 3)]),
    ("in May 2022", [(2022, 5, None)]),
    ("It may be 2022", [(2022, None, None)]),  # the verb "may" is not a month
    ("I think 3 friends came on May 7, 2023", [(2023, 5, 7)]),  # dateutil alone reads 3 May 2007
    ("She went with 2 kids", []),
    ("7/5/2023", []),  # which number is the month?
    ("31 April 2023", []),
    ("I don't know", []),
])
def test_dates_in_free_text(text, dates):
    assert dates_in(text) == [PartialDate(*d) for d in dates]


@pytest.mark.parametrize("prediction, golds, expected", [
    ("On May 7th, 2023.", ["7 May 2023"], True),
    ("It was in May 2023", ["7 May 2023"], False),  # less precise than the gold
    ("7 May 2023", ["May 2023"], True),  # more precise than the gold
    ("8 May 2023", ["7 May 2023"], False),
    ("2022", ["20 January 2022", "2022"], True),  # any gold (answer or alias)
    ("I don't know", ["7 May 2023"], False),
    ("Paris", ["Paris"], None),  # not a temporal question
])
def test_date_match(prediction, golds, expected):
    assert date_match(prediction, golds) is expected
