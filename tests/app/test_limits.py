import os

import pytest
from limits.storage import storage_from_string

from app.errors import RateLimited
from app.limits import RateLimits, address_key

REDIS_ENV = "MEMCHAT_TEST_REDIS_URL"


@pytest.fixture(params=["memory", "redis"])
def storage_uri(request) -> str:
    """Where the counts live: this process's memory, or a Redis server that web replicas share."""
    if request.param == "memory":
        return "memory://"
    url = os.environ.get(REDIS_ENV)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{REDIS_ENV} is not set, but CI=true: CI must test the shared rate limits too "
                        "(.ci/run starts a server with scripts/start-test-redis.sh)")
        pytest.skip(f"Redis not configured: set {REDIS_ENV} (export {REDIS_ENV}=\"$(scripts/start-test-redis.sh)\")")
    storage_from_string(url).reset()  # the counts of earlier tests
    return url


def test_a_used_up_limit_refuses_at_once_and_says_how_long_to_wait(storage_uri):
    limits = RateLimits(storage_uri)
    limits.hit("2/minute", "alice", what="Too many messages")
    limits.hit("2/minute", "alice", what="Too many messages")
    with pytest.raises(RateLimited, match=r"Too many messages; please try again in \d+ seconds") as refused:
        limits.hit("2/minute", "alice", what="Too many messages")
    assert 1 <= refused.value.retry_after_s <= 60
    limits.hit("2/minute", "bob", what="Too many messages")  # another key has its own count


def test_check_does_not_count_and_clear_forgets(storage_uri):
    limits = RateLimits(storage_uri)
    for _ in range(5):
        limits.check("1/hour", "k", what="x")
    limits.record("1/hour", "k")
    with pytest.raises(RateLimited, match="minutes"):
        limits.check("1/hour", "k", what="x")
    limits.clear("1/hour", "k")
    limits.check("1/hour", "k", what="x")


def test_replicas_on_one_redis_count_together(storage_uri):
    """A person must not get each limit once per web replica (nor a login throttle per replica)."""
    a, b = RateLimits(storage_uri), RateLimits(storage_uri)
    a.hit("3/minute", "alice", what="Too many messages")
    b.hit("3/minute", "alice", what="Too many messages")
    b.hit("3/minute", "alice", what="Too many messages")
    if storage_uri == "memory://":  # each process its own count: what a single process is allowed
        a.hit("3/minute", "alice", what="Too many messages")
        return
    with pytest.raises(RateLimited):
        a.hit("3/minute", "alice", what="Too many messages")
    b.clear("3/minute", "alice")
    a.hit("3/minute", "alice", what="Too many messages")


def test_a_client_is_its_ipv4_address_or_its_ipv6_slash_64():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key(None) is None and address_key("testclient") == "testclient"
