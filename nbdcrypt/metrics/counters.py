"""The counters the server keeps for its metrics: cheap to bump per request, added up at scrape.

A prometheus-client `Counter.inc()` with labels takes a lock and costs about a microsecond: a
tenth of what a whole page-cache read may cost. So the hot path only bumps plain Python ints in
lists the connection owns, and the collector (collector.py) adds everything up when Prometheus
scrapes. The counters of an export live in `Counters`, keyed by the export's name and owned by
the server: a reload replaces Export objects, never these.

Request durations go into a packed histogram, one flat list per connection (and one per export
for what finished after its connection was counted in): the slot of a request is
`command << ROW_BITS | (nanoseconds >> SHIFT).bit_length()`, and each slot holds
`count * PACK + nanoseconds`, so one list item bumped per request carries both the bucket's
count and the sum. Bucket b holds durations below 2**(SHIFT + b) ns: 8.2 us, 16 us, 33 us, ...
8.6 s, 17 s; longer ones are counted in +Inf.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nbdcrypt.nbd.constants import Cmd, Errno
from nbdcrypt.server.identity import PeerIdentity

SHIFT = 13  # bucket 0: under 2**13 ns (8.192 us)
ROW_BITS = 6  # a command's row has 64 slots: bit_length of any duration in ns is below 64
ROW = 1 << ROW_BITS
PACK = 1 << 64  # a slot is count * PACK + nanoseconds (2**64 ns is 584 years)
BUCKETS = 22  # finite buckets reported: below 2**13 ns ... below 2**34 ns (17.2 s)
BUCKET_BOUNDS = tuple((1 << (SHIFT + b)) / 1e9 for b in range(BUCKETS))  # seconds

REQUEST_COMMANDS = (
    Cmd.READ,
    Cmd.WRITE,
    Cmd.FLUSH,
    Cmd.TRIM,
    Cmd.WRITE_ZEROES,
    Cmd.CACHE,
    Cmd.BLOCK_STATUS,
)
OTHER = 8  # the row of requests with a command the server does not know (refused with EINVAL)
SLOTS = OTHER + 1
COMMAND_LABELS = {int(c): c.name for c in REQUEST_COMMANDS} | {OTHER: "other"}
ERRNO_LABELS = {int(e): e.name for e in Errno}  # the errors NBD carries: a bounded set

IDENTITY_CLASSES = ("plain", "tls", "tls-client-cert")
TRANSPORTS = ("tcp", "unix")
HANDSHAKE_FAILURES = (
    "protocol",  # the client broke a rule of the handshake
    "timeout",  # not finished within server.limits.handshake_timeout
    "tls",  # the TLS handshake failed (no or a bad client certificate, no common cipher, ...)
    "limit",  # refused: over server.limits.max_connections
    "shutdown",  # refused: the server is shutting down
    "unknown_export",  # asked for an export that does not exist, then left
    "denied",  # asked for an export no client rule grants it, then left
    "disconnected",  # closed before transmission, neither refused nor with NBD_OPT_ABORT
)


def new_histogram() -> list[int]:
    """An empty packed histogram: SLOTS rows of ROW slots."""
    return [0] * (SLOTS * ROW)


def command_slot(cmd: int) -> int:
    """The histogram row of a command number (unknown ones share the OTHER row)."""
    return cmd if cmd in COMMAND_LABELS else OTHER


def record(histogram: list[int], slot: int, nanoseconds: int) -> None:
    """Count one request of row `slot` that took `nanoseconds` (the hot path inlines this)."""
    histogram[slot << ROW_BITS | (nanoseconds >> SHIFT).bit_length()] += nanoseconds + PACK


def requests_in(histogram: Sequence[int]) -> int:
    """How many requests a packed histogram counted."""
    return sum(v >> 64 for v in histogram if v)


@dataclass(frozen=True, slots=True)
class Latency:
    """One command's row, unpacked: counts per bucket (not cumulative; the last is +Inf), total."""

    counts: tuple[int, ...]  # BUCKETS + 1 entries
    seconds: float

    @property
    def requests(self) -> int:
        return sum(self.counts)


def unpack_row(histogram: Sequence[int], slot: int) -> Latency:
    row = histogram[slot << ROW_BITS : (slot + 1) << ROW_BITS]
    counts = [v >> 64 for v in row]
    finite = counts[:BUCKETS]
    nanoseconds = sum(v & (PACK - 1) for v in row)
    return Latency((*finite, sum(counts[BUCKETS:])), nanoseconds / 1e9)


def identity_class(identity: PeerIdentity) -> str:
    """`plain`, `tls` (no client certificate) or `tls-client-cert`: never who it is."""
    if not identity.tls:
        return "plain"
    return "tls-client-cert" if identity.tls_subject or identity.tls_sans else "tls"


class Feed(Protocol):
    """A connection in transmission, as its export's counters read it at scrape time."""

    @property
    def latency(self) -> list[int]: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def inflight(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ExportTotals:
    """What the collector reports for one export, at one scrape."""

    latency: list[int]  # packed histogram
    bytes_read: int
    bytes_written: int
    errors: dict[int, int]  # wire errno -> replies
    inflight: int
    connections: int


@dataclass(eq=False)
class ExportCounters:
    """One export's counters. Connections in transmission on it (`feeds`) keep their own and
    are added in at scrape; a connection's are absorbed here when it is done (`detach`)."""

    name: str
    latency: list[int] = field(default_factory=new_histogram)
    bytes_read: int = 0
    bytes_written: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    feeds: set[Feed] = field(default_factory=set)

    def attach(self, conn: Feed) -> None:
        self.feeds.add(conn)

    def detach(self, conn: Feed) -> None:
        """`conn` is closed and idle: its counts become part of the export's own."""
        if conn not in self.feeds:
            return
        self.feeds.discard(conn)
        _add_into(self.latency, conn.latency)
        self.bytes_read += conn.bytes_read
        self.bytes_written += conn.bytes_written

    def totals(self) -> ExportTotals:
        latency = list(self.latency)
        bytes_read, bytes_written, inflight = self.bytes_read, self.bytes_written, 0
        for conn in self.feeds:
            _add_into(latency, conn.latency)
            bytes_read += conn.bytes_read
            bytes_written += conn.bytes_written
            inflight += conn.inflight
        errors = dict(self.errors)
        return ExportTotals(latency, bytes_read, bytes_written, errors, inflight, len(self.feeds))


def _add_into(total: list[int], more: Sequence[int]) -> None:
    for i, v in enumerate(more):
        if v:
            total[i] += v


@dataclass
class ConnectionCounters:
    """Connections by how they came (transport) and who they showed (identity class)."""

    total: Counter[tuple[str, str]] = field(default_factory=Counter)  # (transport, class)
    handshake_failures: Counter[str] = field(default_factory=Counter)  # reason class


@dataclass
class Counters:
    """Every counter of one server, owned by it (never a global): exports by name, connections."""

    exports: dict[str, ExportCounters] = field(default_factory=dict)
    connections: ConnectionCounters = field(default_factory=ConnectionCounters)

    def export(self, name: str) -> ExportCounters:
        found = self.exports.get(name)
        if found is None:
            found = self.exports[name] = ExportCounters(name)
        return found

    def configure(self, names: Iterable[str]) -> None:
        """At start and at each reload: the configured exports have counters (from zero, or
        the ones they had); exports gone from the config keep theirs while connections use them."""
        wanted = list(names)
        for name in wanted:
            self.export(name)
        for name in [n for n, c in self.exports.items() if n not in wanted and not c.feeds]:
            del self.exports[name]
