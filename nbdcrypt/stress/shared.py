"""The shared region of an export: what readers on other connections must see, by flush order.

The region is cut into cells; cell i is written only by its owner (member i % members) and read
by every client, each on its own connection. Every write of a cell is a new *version* whose data
is pattern(owner, op) (pattern.py), so versions are never stored, only named.

What is checked rests on NBD_FLAG_CAN_MULTI_CONN: the effects of a FLUSH, and of a write with
FUA, are visible on every connection once the server has replied to it. Times are the order of
events in this process (all clients share one event loop): a request counts as sent when it is
handed to its connection, a reply as received when it is parsed, so a version published in this
process's view was published on the wire too.

- A version is *published* when its write was acknowledged with FUA, or when a FLUSH (sent by
  any client of the export) was sent after the write was acknowledged and has been answered.
- A read of a cell sent at time S and answered at time R may return, byte by byte, any version
  from the newest one published before S (for the owner reading its own cell: the newest one it
  had acknowledged, published or not) up to the newest one sent before R. Older versions are
  stale: returning one is a mismatch. Newer ones cannot have reached the server.
- A write that failed may have left anything in its cell: the cell is not checked while that
  version is within a read's window, that is until a later version is published.
- Cells are written once with FUA by their owners before the run starts, so every cell has a
  published version before any read.

Versions older than the published one are dropped whenever no read of the cell is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nbdcrypt.stress.model import SNIPPET, Mismatch
from nbdcrypt.stress.pattern import pattern, pattern_array
from nbdcrypt.stress.workload import SharedLayout

SETUP_SEQ = (1 << 20) - 1  # the op number of the FUA writes that set up the cells


@dataclass(slots=True)
class Version:
    cell: int
    writer: int  # the writing client's number in the run (its data pattern)
    seq: int
    index: int  # its position in the cell's history
    issued: int  # ticks
    acked: int | None = None
    failed: bool = False


@dataclass(slots=True)
class _Cell:
    versions: list[Version] = field(default_factory=list)  # versions[0] has index base
    base: int = 0
    published: int = -1  # index of the newest published version
    acked: int = -1  # index of the newest acknowledged one (the owner sees its own writes)
    readers: int = 0

    def at(self, index: int) -> Version:
        return self.versions[index - self.base]


@dataclass(frozen=True, slots=True)
class ReadTicket:
    """A shared read in flight: its cells and the oldest version each may return."""

    first: int
    count: int
    floors: tuple[int, ...]
    issued: int


class SharedModel:
    """The versions of every cell of one export's shared region."""

    def __init__(self, layout: SharedLayout, run: int) -> None:
        self.layout = layout
        self.run = run
        self.cells = [_Cell() for _ in range(layout.cells)]
        self._tick = 0
        self._unpublished: list[Version] = []  # acknowledged, waiting for a FLUSH
        self.unchecked = 0  # cells a read could not check (a failed write in the window)

    def _now(self) -> int:
        self._tick += 1
        return self._tick

    # Writes and flushes -----------------------------------------------------------------------

    def write_issued(self, cell: int, writer: int, seq: int) -> Version:
        c = self.cells[cell]
        version = Version(cell, writer, seq, c.base + len(c.versions), self._now())
        c.versions.append(version)
        return version

    def write_done(self, version: Version, *, ok: bool, fua: bool) -> None:
        version.acked = self._now()
        c = self.cells[version.cell]
        if not ok:
            version.failed = True
        c.acked = max(c.acked, version.index)
        if ok and fua:
            self._publish(version)
        elif ok:
            self._unpublished.append(version)

    def flush_issued(self) -> int:
        return self._now()

    def flush_done(self, issued: int, *, ok: bool) -> None:
        self._now()
        if not ok:
            return
        waiting = []
        for version in self._unpublished:
            assert version.acked is not None
            if version.acked < issued:
                self._publish(version)
            else:
                waiting.append(version)
        self._unpublished = waiting

    def _publish(self, version: Version) -> None:
        c = self.cells[version.cell]
        if version.index > c.published:
            c.published = version.index
            self._prune(c)

    def _prune(self, c: _Cell) -> None:
        if c.readers or c.published <= c.base:
            return
        del c.versions[: c.published - c.base]
        c.base = c.published

    # Reads ------------------------------------------------------------------------------------

    def read_issued(self, first: int, count: int, reader: int) -> ReadTicket:
        """A read of `count` cells from `first` by member `reader` is being sent."""
        floors = []
        for i in range(first, first + count):
            c = self.cells[i]
            c.readers += 1
            own = self.layout.owner(i) == reader
            floors.append(max(c.published, c.acked) if own else c.published)
        return ReadTicket(first, count, tuple(floors), self._now())

    def read_done(self, ticket: ReadTicket, data: bytes | bytearray | None) -> Mismatch | None:
        """Its reply arrived (data None if it failed); the first stale or foreign cell."""
        now = self._now()
        result = None
        for k in range(ticket.count):
            cell = ticket.first + k
            c = self.cells[cell]
            if data is not None and result is None:
                size = self.layout.cell
                result = self._check(cell, ticket.floors[k], now, data[k * size : (k + 1) * size])
            c.readers -= 1
            self._prune(c)
        return result

    def _check(self, cell: int, floor: int, now: int, got: bytes | bytearray) -> Mismatch | None:
        c = self.cells[cell]
        if floor < 0:
            self.unchecked += 1
            return None
        window = [v for v in c.versions[floor - c.base :] if v.issued < now]
        if any(v.failed for v in window):
            self.unchecked += 1
            return None
        offset = self.layout.start + cell * self.layout.cell
        size = self.layout.cell
        found = np.frombuffer(got, dtype=np.uint8)
        ok = np.zeros(size, dtype=np.bool_)
        for v in window:
            ok |= pattern_array(self.run, v.writer, v.seq, offset, size) == found
        if ok.all():
            return None
        first = int(np.argmin(ok))
        oldest = window[0]
        expected = pattern(self.run, oldest.writer, oldest.seq, offset, size)
        return Mismatch(
            offset=offset,
            length=size,
            at=offset + first,
            differing=int(size - np.count_nonzero(ok)),
            expected=expected[first : first + SNIPPET],
            found=found[first : first + SNIPPET].tobytes(),
            rule=f"shared cell {cell}: {_versions(window)}",
        )


def _versions(window: list[Version]) -> str:
    def name(v: Version) -> str:
        return "setup" if v.seq == SETUP_SEQ else f"op #{v.seq}"

    owner = window[0].writer
    names = ", ".join(name(v) for v in window)
    published = (
        "published"
        if len(window) == 1
        else "the first published, the others in flight or unflushed"
    )
    return f"client {owner}'s {names} ({published})"
