"""Limits and knobs of storage, each documented where it is declared.

The defaults are meant for production; tests lower the password-hashing cost and the retry delays.
"""

from __future__ import annotations

from dataclasses import dataclass

from argon2 import PasswordHasher

SNAPSHOT_STORES = ("files", "database")
"""Where adapter snapshots' bytes may be kept (StorageSettings.snapshot_store)."""

USERNAME_COLUMN_CHARS = 64
"""Width of the username column: no setting may allow a longer username than the schema holds."""


@dataclass(frozen=True)
class StorageSettings:
    username_max_chars: int = 32
    """Longest username, counted after NFKC normalisation and case folding."""

    password_min_chars: int = 8
    """Shortest password accepted when an account is created."""

    password_max_chars: int = 1024
    """Longest password: hashing cost grows with length, so an unbounded one is a denial of service."""

    message_max_chars: int = 32_000
    """Longest chat message, in characters (about 8k tokens); larger payloads are refused unread."""

    title_max_chars: int = 200
    """Longest conversation title."""

    api_keys_per_user: int = 20
    """Most API keys one user may hold at once (each is one more way into their account)."""

    login_idle_s: float = 30 * 60
    """A browser's login ends once it has not acted for this long (an open page acts every few seconds)."""

    login_lifetime_s: float = 24 * 3600
    """...and this long after it began, however active: then its person logs in again."""

    json_max_bytes: int = 64 * 1024
    """Largest JSON document (snapshot statistics, audit details) once encoded."""

    turn_lease_s: float = 30.0
    """A web replica answering a user's turn holds it for this long, renewed every third of it while
    the reply runs: a replica that dies locks its user out for this long at most."""

    snapshot_store: str = "files"
    """Where new adapter snapshots' bytes go: "files" (the data folder, one machine) or "database"
    (beside the rows, for replicas and workers on several machines sharing only the database).
    Either is read whatever this says: a snapshot's row tells where its bytes are."""

    snapshot_max_bytes: int = 256 * 1024 * 1024
    """Largest adapter snapshot file; a state is r*r fp32 per adapted module, far below this."""

    busy_timeout_ms: int = 10_000
    """SQLite only: how long a writer waits for another writer's lock before failing."""

    job_max_attempts: int = 5
    """Runs of a compression job (the first one included) before it is marked 'failed'."""

    job_retry_base_s: float = 30.0
    """Delay before the first retry of a failed job; each further retry waits twice as long."""

    job_retry_max_s: float = 3600.0
    """Upper bound of the retry delay."""

    job_lease_s: float = 120.0
    """A running job is its worker's for this long after the claim or the worker's last renewal
    (it renews every third of it while it runs); then another worker may take the job over."""

    argon2_time_cost: int = PasswordHasher().time_cost
    """Argon2id passes over memory. Changing a cost rehashes each password at its next login."""

    argon2_memory_cost_kib: int = PasswordHasher().memory_cost
    """Argon2id memory per hash, in KiB."""

    argon2_parallelism: int = PasswordHasher().parallelism
    """Argon2id lanes."""

    def __post_init__(self) -> None:
        if not 1 <= self.username_max_chars <= USERNAME_COLUMN_CHARS:
            raise ValueError(f"username_max_chars must be between 1 and {USERNAME_COLUMN_CHARS}")
        if not 1 <= self.password_min_chars <= self.password_max_chars:
            raise ValueError("need 1 <= password_min_chars <= password_max_chars")
        for name in ("message_max_chars", "title_max_chars", "api_keys_per_user", "json_max_bytes",
                     "snapshot_max_bytes", "busy_timeout_ms", "job_max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.login_idle_s <= self.login_lifetime_s:
            raise ValueError("need 0 < login_idle_s <= login_lifetime_s")
        if not 0 <= self.job_retry_base_s <= self.job_retry_max_s:
            raise ValueError("need 0 <= job_retry_base_s <= job_retry_max_s")
        if self.snapshot_store not in SNAPSHOT_STORES:
            raise ValueError(f"snapshot_store must be one of {SNAPSHOT_STORES}")
        if not (self.job_lease_s > 0 and self.turn_lease_s > 0):
            raise ValueError("job_lease_s and turn_lease_s must be > 0")

    def password_hasher(self) -> PasswordHasher:
        """Argon2id with these costs (argon2-cffi's defaults follow RFC 9106's low-memory profile)."""
        return PasswordHasher(time_cost=self.argon2_time_cost, memory_cost=self.argon2_memory_cost_kib,
                              parallelism=self.argon2_parallelism)

    def retry_delay_s(self, attempts: int) -> float:
        """Exponential backoff after the given number of failed runs (1 -> base, 2 -> 2*base, ...)."""
        return min(self.job_retry_max_s, self.job_retry_base_s * 2 ** max(0, attempts - 1))
