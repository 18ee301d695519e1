"""Hostile connections that run beside the verifying clients (`--abuse`).

- vanish: again and again until the run ends: connect, then either send the header and half
  the payload of a large WRITE and reset the connection (even cycles), or pipeline a few large
  READs and close without reading a reply (odd cycles).
- half-request: connect, send half a request header (even abusers) or a large WRITE's header
  and half its payload (odd ones), and hold the connection open, silent, until the run ends.
- slow-reader: connect, stop reading from the socket, pipeline READs asking for up to 2 GiB of
  replies, and hold the connection open until the run ends.

None of them ever sends a complete WRITE, so they cannot change what the export holds, and the
verifying clients' checks stay exact. What they test is the server: that it bounds what it
buffers for a connection (a server that kept all they ask for would grow by gigabytes, which
--watch-pid shows), frees what a vanished connection held, and goes on serving the others.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from nbdcrypt.nbd.client_handshake import ExportInfo
from nbdcrypt.nbd.constants import Cmd
from nbdcrypt.stress.session import Session, SessionError, open_session
from nbdcrypt.stress.uri import NbdUri

BIG = 32 * 1024 * 1024  # the largest request an abuser sends (the spec's safe maximum)
SLOW_READS = 64  # READs a slow reader pipelines
VANISH_READS = 4
PAUSE = 0.01  # seconds between vanish cycles: a steady trickle, not a busy loop
_DRAIN = 0.2  # seconds an abuser waits for its half payload to leave


@dataclass(slots=True)
class AbuseStats:
    connections: Counter[str] = field(default_factory=Counter)  # by kind
    connect_failures: Counter[str] = field(default_factory=Counter)
    requested: Counter[str] = field(default_factory=Counter)  # reply bytes asked for, unread
    half_sent: Counter[str] = field(default_factory=Counter)  # payload bytes of half writes
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class AbuseTarget:
    uri: NbdUri
    info: ExportInfo
    structured: bool
    timeout: float

    @property
    def big(self) -> int:
        """A large, aligned request length the export accepts."""
        unit = self.info.min_block
        size = min(BIG, self.info.max_payload, self.info.size)
        return max(unit, size - size % unit)

    def offset(self, i: int) -> int:
        unit = self.info.min_block
        span = max(0, self.info.size - self.big) // unit
        return (i * 7919 % (span + 1)) * unit if span else 0


async def run_abuser(
    kind: str, index: int, target: AbuseTarget, stats: AbuseStats, stop: asyncio.Event
) -> None:
    """One hostile connection (or, for vanish, a series of them) until `stop`."""
    if kind == "vanish":
        await _vanish(target, stats, stop)
        return
    session = await _connect(kind, target, stats)
    if session is None:
        return
    try:
        if kind == "half-request":
            if index % 2:
                await _half_write(kind, session, target, stats)
            else:
                assert session.codec is not None
                _, header = session.codec.request(Cmd.READ, 0, target.info.min_block)
                session.transport.write(header[: len(header) // 2])
        else:  # slow-reader
            session.transport.pause_reading()
            for i in range(SLOW_READS):
                session.submit(Cmd.READ, target.offset(i), target.big)
            stats.requested[kind] += SLOW_READS * target.big
        await stop.wait()
    finally:
        session.abort()


async def _vanish(target: AbuseTarget, stats: AbuseStats, stop: asyncio.Event) -> None:
    """Connect, leave a request unfinished, go; again and again until `stop`."""
    cycle = 0
    while not stop.is_set():
        session = await _connect("vanish", target, stats)
        if session is None:
            await _sleep_or_stop(stop, 0.1)
            continue
        if cycle % 2 == 0:  # half a write payload, then a reset
            await _half_write("vanish", session, target, stats)
            session.abort()
        else:  # large reads whose replies are never read, then a plain close
            for i in range(VANISH_READS):
                session.submit(Cmd.READ, target.offset(cycle + i), target.big)
            stats.requested["vanish"] += VANISH_READS * target.big
            await asyncio.sleep(PAUSE)
            session.close()
        cycle += 1
        await _sleep_or_stop(stop, PAUSE)


async def _connect(kind: str, target: AbuseTarget, stats: AbuseStats) -> Session | None:
    try:
        session = await open_session(
            target.uri, structured=target.structured, timeout=target.timeout
        )
    except SessionError as exc:
        stats.connect_failures[kind] += 1
        stats.last_error = str(exc)
        return None
    stats.connections[kind] += 1
    return session


async def _half_write(kind: str, session: Session, target: AbuseTarget, stats: AbuseStats) -> None:
    """The header of a large WRITE and half its payload; wait (a little) for it to leave."""
    assert session.codec is not None
    big = target.big
    _, header = session.codec.request(Cmd.WRITE, target.offset(0), big)
    half = big // 2
    session.transport.writelines((header, bytes(half)))
    stats.half_sent[kind] += half
    try:
        async with asyncio.timeout(_DRAIN):
            await session.drain()
    except TimeoutError:
        pass


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass
