"""One verifying stress client: its connection, its operations, its checks.

The client takes its operations in order from its Workload and keeps up to `queue_depth` in
flight. It holds an operation back (never skips it) while it would overlap an operation in
flight where either of them modifies data, so every read has exactly one right answer in the
model (model.py) and shared reads have a known window of versions (shared.py). Modifications
are applied to the model when they are sent; reads are checked when their reply arrives.

A client stops when its run is told to stop, when it has done its `ops`, or for good when its
connection breaks: a protocol error, a lost connection, a request with no reply within the
timeout, or ESHUTDOWN from the server (which the spec says to answer with a disconnect).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

from nbdcrypt.nbd.client_transmission import Reply
from nbdcrypt.nbd.constants import Cmd, CmdFlag, Errno
from nbdcrypt.stress.model import Mismatch, RegionModel
from nbdcrypt.stress.pattern import describe, pattern
from nbdcrypt.stress.session import Session
from nbdcrypt.stress.shared import SETUP_SEQ, ReadTicket, SharedModel, Version
from nbdcrypt.stress.stats import MismatchRecord, Stats
from nbdcrypt.stress.workload import ClientLayout, Kind, Op

_CMD = {
    Kind.READ: Cmd.READ,
    Kind.WRITE: Cmd.WRITE,
    Kind.FLUSH: Cmd.FLUSH,
    Kind.TRIM: Cmd.TRIM,
    Kind.ZERO: Cmd.WRITE_ZEROES,
    Kind.SHARED_READ: Cmd.READ,
    Kind.SHARED_WRITE: Cmd.WRITE,
}


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What every client of a run shares."""

    run: int  # the data pattern's run tag
    clients: int  # in the whole run
    queue_depth: int
    ops: int | None
    timeout: float
    trim_any: bool  # a trimmed range may read as anything


@dataclass(slots=True)
class _InFlight:
    op: Op
    sent: float
    version: Version | None = None  # a shared write
    ticket: ReadTicket | None = None  # a shared read
    flush_tick: int = 0  # a FLUSH, for the shared model


class StressClient:
    """One connection driving one Workload, verifying as it goes."""

    def __init__(
        self,
        layout: ClientLayout,
        ops: Iterator[Op],
        config: ClientConfig,
        stats: Stats,
        shared: SharedModel | None,
    ) -> None:
        self.layout = layout
        self.ops = ops
        self.config = config
        self.stats = stats
        self.shared = shared
        self.model = RegionModel(layout.region_start, layout.region_length, layout.align)
        self.session: Session | None = None
        self.done_ops = 0
        self.failed: str | None = None
        self._inflight: dict[int, _InFlight] = {}
        self._wake = asyncio.Event()
        self._shutdown = False  # the server said ESHUTDOWN

    @property
    def number(self) -> int:
        return self.layout.client

    def attach(self, session: Session) -> None:
        self.session = session
        session.on_reply = self._on_reply
        session.on_close = self._on_close

    # Phases -----------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Write every shared cell this client owns once, with FUA: their first versions."""
        if self.shared is None or self.session is None:
            return
        s = self.shared.layout
        for cell in self.layout.owned_cells():
            op = Op(SETUP_SEQ, Kind.SHARED_WRITE, s.start + cell * s.cell, s.cell, fua=True)
            if not await self._wait_room(op):
                return
            self._issue(op)
        await self._drain()

    async def run(self, stop: asyncio.Event) -> None:
        """Issue operations until stopped, then wait for the replies and disconnect."""
        if self.session is None:
            return
        limit = self.config.ops
        for op in self.ops:
            if stop.is_set() or self.failed or self._shutdown:
                break
            if limit is not None and self.done_ops >= limit:
                break
            if not await self._wait_room(op, stop):
                break
            self._issue(op)
            self.done_ops += 1
            if self.session.write_paused:
                await self.session.drain()
        await self._drain()
        if not self.failed:
            await self.session.disconnect()
            self.stats.clients_done += 1

    def abort(self) -> None:
        if self.session is not None:
            self.session.abort()

    # Flow -------------------------------------------------------------------------------------

    async def _wait_room(self, op: Op, stop: asyncio.Event | None = None) -> bool:
        """Wait until `op` may be sent; False if the client failed meanwhile."""
        while len(self._inflight) >= self.config.queue_depth or self._conflicts(op):
            if not await self._wait_reply():
                return False
            if stop is not None and stop.is_set():
                return False
        return not self.failed

    async def _drain(self) -> None:
        while self._inflight and not self.failed:
            await self._wait_reply()

    async def _wait_reply(self) -> bool:
        """Wait for a reply (or a failure); False when the client failed."""
        self._wake.clear()
        try:
            async with asyncio.timeout(self.config.timeout):
                await self._wake.wait()
        except TimeoutError:
            oldest = min(self._inflight.values(), key=lambda f: f.sent, default=None)
            if oldest is not None and time.perf_counter() - oldest.sent >= self.config.timeout:
                self._fail("timeout", f"{oldest.op}: no reply within {self.config.timeout:g} s")
        return not self.failed

    def _conflicts(self, op: Op) -> bool:
        if not op.length:
            return False
        for other in self._inflight.values():
            o = other.op
            touches = o.length and op.offset < o.end and o.offset < op.end
            if touches and (op.kind.modifies or o.kind.modifies):
                return True
        return False

    # Requests ---------------------------------------------------------------------------------

    def _issue(self, op: Op) -> None:
        session = self.session
        assert session is not None
        kind = op.kind
        flags = int(CmdFlag.FUA) if op.fua else 0
        entry = _InFlight(op, time.perf_counter())
        payload: bytes | None = None
        if kind is Kind.WRITE:
            payload = pattern(self.config.run, self.number, op.seq, op.offset, op.length)
            self.model.write(op.offset, payload)
        elif kind is Kind.ZERO:
            self.model.zero(op.offset, op.length)
        elif kind is Kind.TRIM:
            self.model.trim(op.offset, op.length, any_content=self.config.trim_any)
        elif kind is Kind.FLUSH:
            if self.shared is not None:
                entry.flush_tick = self.shared.flush_issued()
        elif kind is Kind.SHARED_WRITE:
            assert self.shared is not None
            cell = self.shared.layout.cell_of(op.offset)
            entry.version = self.shared.write_issued(cell, self.number, op.seq)
            payload = pattern(self.config.run, self.number, op.seq, op.offset, op.length)
        elif kind is Kind.SHARED_READ:
            assert self.shared is not None
            s = self.shared.layout
            entry.ticket = self.shared.read_issued(
                s.cell_of(op.offset), op.length // s.cell, self.layout.member
            )
        handle = session.submit(_CMD[kind], op.offset, op.length, flags, payload)
        self._inflight[handle] = entry

    def _on_reply(self, reply: Reply) -> None:
        entry = self._inflight.pop(reply.handle, None)
        if entry is None:  # the codec checks handles; this is a bug of ours
            self._fail("protocol", f"reply for unknown handle {reply.handle}")
            return
        op = entry.op
        ok = not reply.error
        self.stats.record(op.kind.value, op.length, time.perf_counter() - entry.sent, reply.error)
        kind = op.kind
        if kind is Kind.READ and reply.data is not None:
            mismatch = self.model.check_read(op.offset, reply.data)
            if mismatch is not None:
                self._mismatch(op, mismatch, reply.data)
        elif kind in (Kind.WRITE, Kind.ZERO, Kind.TRIM) and not ok:
            self.model.forget(op.offset, op.length)
        elif kind is Kind.FLUSH and self.shared is not None:
            self.shared.flush_done(entry.flush_tick, ok=ok)
        elif kind is Kind.SHARED_WRITE:
            assert self.shared is not None and entry.version is not None
            self.shared.write_done(entry.version, ok=ok, fua=op.fua)
        elif kind is Kind.SHARED_READ:
            assert self.shared is not None and entry.ticket is not None
            before = self.shared.unchecked
            mismatch = self.shared.read_done(entry.ticket, reply.data)
            self.stats.unchecked_reads += self.shared.unchecked - before
            if mismatch is not None and reply.data is not None:
                self._mismatch(op, mismatch, reply.data)
        if reply.error == Errno.ESHUTDOWN:
            self._shutdown = True
        self._wake.set()

    def _mismatch(self, op: Op, mismatch: Mismatch, data: bytes | bytearray) -> None:
        origin = describe(self.config.run, data, op.offset, mismatch.at, self.config.clients)
        self.stats.mismatch(MismatchRecord(self.number, str(op), mismatch, origin))

    def _on_close(self, reason: str | None) -> None:
        kind = "protocol" if reason and reason.startswith("protocol") else "disconnected"
        inflight = len(self._inflight)
        self._fail(kind, f"{reason} ({inflight} requests in flight)")

    def _fail(self, kind: str, message: str) -> None:
        if self.failed:
            return
        self.failed = message
        self.stats.client_failed(self.number, kind, message)
        self._wake.set()
        if self.session is not None:
            self.session.abort()
