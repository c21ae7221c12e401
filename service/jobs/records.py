"""Ledger records: job states, ids, and the records read back (jobs, events, leases)."""
from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

PENDING = "PENDING"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Allowed changes to a different state. Setting the current state again is
# allowed too: it updates the message of a live job and is a no-op on a
# finished one.
TRANSITIONS = {
    PENDING: frozenset({RUNNING, SUCCEEDED, FAILED, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

MAX_BLOCKS = 10 ** 10         # block (task) indices: 8 digits, more past 10⁸ (1 mm³ needs ~10⁷ tasks)
MAX_TTL_S = 7 * 24 * 3600.0
MAX_PAGE_SIZE = 1000

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_JOB_ID_RE = re.compile(r"^[0-7][0-9a-hjkmnp-tv-z]{25}$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_EVENT_NAME_RE = re.compile(r"^(\d{20})-([0-9a-f]{8})-(\d{8})\.json$")
_EVENT_ID_RE = re.compile(r"^\d{20}-[0-9a-f]{8}-\d{8}$")
_DONE_RE = re.compile(r"^(\d{8,10})\.done$")


# ----------------------------------------------------------------- errors

class JobNotFound(KeyError):
    """No job with this id in the ledger."""
    code = "NOT_FOUND"  # gRPC status (service.errors.status_of)

    def __init__(self, job_id: str, url: str = ""):
        self.job_id, self.url = job_id, url
        where = f" in ledger {url}" if url else ""
        super().__init__(f"job {job_id!r} not found{where}")

    def __reduce__(self):
        return type(self), (self.job_id, self.url)

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0])


class JobExists(ValueError):
    """A job with this id already exists."""
    code = "ALREADY_EXISTS"


class IllegalTransition(ValueError):
    """The requested state change is not allowed from the current state."""
    code = "FAILED_PRECONDITION"


# ----------------------------------------------------------------- records

@dataclass(frozen=True)
class JobRecord:
    """A job as stored in the ledger.

    ``blocks_done`` is counted from the completion markers for live jobs and
    is the count taken when a job reached its terminal state for finished ones.
    """
    job_id: str
    spec: dict
    state: str
    message: str
    created: float
    updated: float
    num_blocks: int
    blocks_done: int
    cancel_requested: bool
    owner: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class Event:
    """One event of a job; ``id`` is the cursor for ``Ledger.events(after=...)``."""
    id: str
    job_id: str
    time: float
    kind: str
    message: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    """A lease on one block."""
    job_id: str
    index: int
    owner: str
    token: str
    acquired: float
    expires_at: float

    def expired(self, now: float) -> bool:
        return now > self.expires_at


# ----------------------------------------------------------------- ids and checks

_id_lock = threading.Lock()
_id_last = [0, 0]  # last (ms, random) handed out by this process


def new_job_id(now: float | None = None) -> str:
    """A new job id: a lowercase ULID (48-bit ms time + 80 random bits, 26 chars).

    Ids sort by creation time (strictly increasing within one process) and are
    valid DNS labels, so they can be used in Kubernetes object names.
    """
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    with _id_lock:
        if ms <= _id_last[0]:  # same millisecond (or clock went back): count up
            ms, rnd = _id_last[0], (_id_last[1] + 1) & ((1 << 80) - 1)
        else:
            rnd = secrets.randbits(80)
        _id_last[:] = [ms, rnd]
    value = (ms << 80) | rnd
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def validate_job_id(job_id: Any) -> str:
    """Return ``job_id`` if it is a ledger job id, else raise ValueError."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
        raise ValueError(
            f"job_id must be a 26-character lowercase ULID (digits and letters "
            f"{_CROCKFORD[10:]!r}, as made by new_job_id()), got {job_id!r}")
    return job_id


def _check_owner(owner: Any) -> str:
    if not isinstance(owner, str) or not _OWNER_RE.match(owner):
        raise ValueError(
            "owner must be 1-128 characters of letters, digits and '_.:@-' "
            f"starting with a letter or digit, got {owner!r}")
    return owner


def _check_ttl(ttl_s: Any) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) \
            or not (0 < ttl_s <= MAX_TTL_S):
        raise ValueError(f"ttl_s must be a number in (0, {MAX_TTL_S:g}] seconds, got {ttl_s!r}")
    return float(ttl_s)


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value
