import pytest

from app.errors import RateLimited
from app.limits import RateLimits, address_key


def test_a_used_up_limit_refuses_at_once_and_says_how_long_to_wait():
    limits = RateLimits()
    limits.hit("2/minute", "alice", what="Too many messages")
    limits.hit("2/minute", "alice", what="Too many messages")
    with pytest.raises(RateLimited, match=r"Too many messages; please try again in \d+ seconds") as refused:
        limits.hit("2/minute", "alice", what="Too many messages")
    assert 1 <= refused.value.retry_after_s <= 60
    limits.hit("2/minute", "bob", what="Too many messages")  # another key has its own count


def test_check_does_not_count_and_clear_forgets():
    limits = RateLimits()
    for _ in range(5):
        limits.check("1/hour", "k", what="x")
    limits.record("1/hour", "k")
    with pytest.raises(RateLimited, match="minutes"):
        limits.check("1/hour", "k", what="x")
    limits.clear("1/hour", "k")
    limits.check("1/hour", "k", what="x")


def test_a_client_is_its_ipv4_address_or_its_ipv6_slash_64():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key(None) is None and address_key("testclient") == "testclient"
