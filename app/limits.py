"""Rate limits: what one person, one address or the whole server may ask for in a while.

Counted in moving windows by the `limits` library: in memory where one process serves the app, in
Redis where web replicas share the counts (AppSettings.rate_limit_storage; a person must not get
each limit once per replica). A refused request is answered at once with how long to wait;
nothing sleeps in a request handler, so a flood of wrong passwords for one name cannot occupy the
workers that serve everyone else.
"""

from __future__ import annotations

import ipaddress
import math
import time
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from .errors import RateLimited


def client_address(request) -> str | None:
    """The client of a request (Starlette's or Gradio's), as rate limits and download links count it."""
    client = getattr(request, "client", None)
    return address_key(client.host if client is not None else None)


def address_key(host: str | None) -> str | None:
    """What counts as one client: its IPv4 address, or its IPv6 /64 (one home or server gets a
    whole /64, and could otherwise step through its addresses to escape every limit)."""
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address (a test client's name): itself
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class RateLimits:
    """Counts uses against limits written as '5/hour' (the limits given by the app's settings)."""

    def __init__(self, storage_uri: str = "memory://") -> None:
        """storage_uri: where the counts live, as `limits` names storages (memory://, redis://host:port)."""
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self._items: dict[str, RateLimitItem] = {}

    def check(self, limit: str, *keys: str, what: str) -> None:
        """Refuse (RateLimited) if the limit is used up for these keys, without counting a hit."""
        item = self._item(limit)
        if not self._limiter.test(item, *keys):
            self._refuse(item, keys, what)

    def hit(self, limit: str, *keys: str, what: str) -> None:
        """Count one use; refuse (RateLimited) if the limit was already used up."""
        item = self._item(limit)
        if not self._limiter.hit(item, *keys):
            self._refuse(item, keys, what)

    def record(self, limit: str, *keys: str) -> None:
        """Count one use without refusing (a failed login is counted after it failed)."""
        self._limiter.hit(self._item(limit), *keys)

    def clear(self, limit: str, *keys: str) -> None:
        self._limiter.clear(self._item(limit), *keys)

    def _item(self, limit: str) -> RateLimitItem:
        if limit not in self._items:
            self._items[limit] = parse(limit)
        return self._items[limit]

    def _refuse(self, item: RateLimitItem, keys: tuple[str, ...], what: str) -> None:
        reset = self._limiter.get_window_stats(item, *keys).reset_time
        wait = max(1, math.ceil(reset - time.time()))
        raise RateLimited(f"{what}; please try again in {_duration(wait)}", wait)


def _duration(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minutes"
