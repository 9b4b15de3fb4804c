"""Refusals are AppErrors, told in words for people; anything else, storage's own errors included,
is a fault: logged with its traceback, shown as a generic message with a reference."""

import logging

import pytest

from app.errors import AccessDenied, Gone, InvalidInput, describe, refusing
from storage import NotFound, ValidationError


def test_a_refusal_is_shown_as_it_is_and_logged_in_one_line(caplog):
    with caplog.at_level(logging.INFO):
        shown = describe(AccessDenied("Please log in"), "chat")
    assert shown == "Please log in."
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.INFO, None)]
    assert describe(InvalidInput("text", "is empty"), "chat") == "The message is empty."


def test_storage_errors_are_refusals_only_where_the_services_say_so(caplog):
    with pytest.raises(InvalidInput) as refused:
        with refusing():
            raise ValidationError("username", "is already taken")
    assert (refused.value.field, str(refused.value)) == ("username", "The username is already taken")
    with pytest.raises(Gone):
        with refusing():
            raise NotFound("user 1 has no message 7")
    # elsewhere a storage error is a bug of ours: a fault, whose words tell nothing of it
    shown = describe(ValidationError("generator_id", "must be text"), "compress now")
    assert shown.startswith("Something went wrong on our side (reference ") and "generator_id" not in shown
    fault = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert fault.exc_info is not None and "compress now failed (reference" in fault.getMessage()


def test_only_an_unreachable_database_or_redis_is_an_outage_the_rest_stays_a_fault():
    """An outage is a 503 the person may retry; a deadlock or a broken query is a fault to log in full."""
    import sqlite3
    from types import SimpleNamespace

    import redis.exceptions
    from sqlalchemy.exc import OperationalError

    from app.errors import Unavailable, as_outage

    def database(orig) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig)

    assert isinstance(as_outage(database(SimpleNamespace(sqlstate=None))), Unavailable)  # never connected
    assert isinstance(as_outage(database(SimpleNamespace(sqlstate="08006"))), Unavailable)  # connection lost
    assert isinstance(as_outage(database(SimpleNamespace(sqlstate="57P01"))), Unavailable)  # server shut down
    assert as_outage(database(SimpleNamespace(sqlstate="40P01"))) is None  # a deadlock: a fault
    assert as_outage(database(sqlite3.OperationalError("no such table: users"))) is None
    assert isinstance(as_outage(database(sqlite3.OperationalError("database is locked"))), Unavailable)
    store = as_outage(redis.exceptions.ConnectionError("refused"))
    assert isinstance(store, Unavailable) and "shared store" in str(store)
    assert as_outage(ValueError("x")) is None
