"""Counters of a stress run: operations, bytes and latencies by kind, errors by kind, mismatches,
and what happened to each client. One Stats is shared by every client of a run (they all run on
one event loop), so the progress line and the summary read the same numbers."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field

from nbdcrypt.nbd.constants import Errno
from nbdcrypt.stress.model import Mismatch

MAX_REPORTED = 20  # mismatches kept in full; the rest are counted


def errno_name(error: int) -> str:
    """An NBD error number as the spec names it (EIO), or 'error N'."""
    return Errno(error).name if error in Errno._value2member_map_ else f"error {error}"


@dataclass(slots=True)
class KindStats:
    ops: int = 0
    bytes: int = 0
    errors: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))


@dataclass(frozen=True, slots=True)
class MismatchRecord:
    client: int
    op: str
    mismatch: Mismatch
    found_origin: str  # whose data the first differing word looks like (pattern.describe)

    def describe(self) -> str:
        origin = f" [found: {self.found_origin}]" if self.found_origin else ""
        return f"client {self.client} {self.op}: {self.mismatch.describe()}{origin}"


@dataclass(slots=True)
class Stats:
    kinds: dict[str, KindStats] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)  # "write EIO", "protocol", ...
    mismatches: list[MismatchRecord] = field(default_factory=list)
    mismatch_count: int = 0
    failures: list[str] = field(default_factory=list)  # one line per client that failed
    clients_done: int = 0
    clients_failed: int = 0
    unchecked_reads: int = 0  # shared cells a read could not check

    def record(self, kind: str, nbytes: int, latency: float, error: int) -> None:
        k = self.kinds.get(kind)
        if k is None:
            k = self.kinds[kind] = KindStats()
        k.ops += 1
        k.latencies.append(latency)
        if error:
            k.errors += 1
            self.errors[f"{kind} {errno_name(error)}"] += 1
        else:
            k.bytes += nbytes

    def mismatch(self, record: MismatchRecord) -> None:
        self.mismatch_count += 1
        self.errors["mismatch"] += 1
        if len(self.mismatches) < MAX_REPORTED:
            self.mismatches.append(record)

    def client_failed(self, client: int, kind: str, message: str) -> None:
        """A client stopped for good: it could not connect, lost its connection, saw a protocol
        error or a request that got no reply."""
        self.clients_failed += 1
        self.errors[kind] += 1
        self.failures.append(f"client {client}: {message}")

    @property
    def total_ops(self) -> int:
        return sum(k.ops for k in self.kinds.values())

    @property
    def total_bytes(self) -> int:
        """Bytes read and written (not trimmed or zeroed)."""
        return sum(k.bytes for name, k in self.kinds.items() if "read" in name or "write" in name)

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def reply_errors(self) -> int:
        """Errors the server replied with (not mismatches or client failures)."""
        return sum(k.errors for k in self.kinds.values())
