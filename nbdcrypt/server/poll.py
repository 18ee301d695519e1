"""Busy-polling a connection thread's socket for the next request, where that beats sleeping.

Why (docs/ARCHITECTURE.md, "Busy polling"): a thread that sleeps in recv() lets its vCPU halt.
The client's next request must then wake it: an interrupt to the halted vCPU and a VM entry,
after which the first request runs on cold caches. A client at queue depth 1 pays that on
every request, and a Python server pays it more than a C one (measured here: 108 us per 4 KiB
read sleeping, 56 us polling, nbdkit 65-75 us). Polling the socket for a few tens of
microseconds after a reply keeps the vCPU awake for a request that is that close, as
net.core.busy_poll does for network sockets and io_poll for NVMe queues.

When: only while its connection is the server's only one in transmission (with two vCPUs,
a thread that polls takes a CPU that other clients and their connections need: two clients
at depth 1 lost up to a fifth of their IOPS to one poller); only after a read that brought
one small request and nothing more (a client that waits for each reply: pipelining and large
transfers are throughput work, and polling whenever the socket was empty cost nbdcopy's
writes 13% more server CPU); and only while this connection's recent waits of that kind were
within the budget (a weighted mean): an idle or slow client is never polled for, a fast one
that comes back is polled for again within a few requests. The poll runs in C with the GIL
let go (_spin.c), yielding the CPU to any task waiting for it; a poll during which this
thread had its CPU for less than most of the time backs polling off (others want the CPU).
Without the C module there is no polling.
"""

from __future__ import annotations

import socket
import time
from typing import Protocol

try:
    from nbdcrypt.server._spin import recv_spin
except ImportError:  # not built (no compiler at install): no busy polling
    recv_spin = None  # type: ignore[assignment]

_clock = time.monotonic
_cpu = time.thread_time
_JUDGED = 20e-6  # polls at least this long tell whether this thread had its CPU to itself
_SHARED = 0.75  # ran less than this share of a poll: the CPU was wanted elsewhere
_BACKOFF_MAX = 1024  # receives without polling after repeated polls on a busy machine
_CAP = 8  # a wait counts as at most this many budgets: a long idle spell is forgotten quickly
_WEIGHT = 0.25  # of the newest wait in the mean


def available() -> bool:
    """Whether busy polling can run here (its C module was built)."""
    return recv_spin is not None


class Census(Protocol):
    """How many connection threads the server runs (changed under the server lock)."""

    connection_threads: int


class SocketPoller:
    """Receives a connection's next bytes, polling for up to `budget` seconds before sleeping.

    Its counters: `hits` (receives that polling served), `misses` (polls that ran out of budget,
    then slept), `sleeps` (receives that did not poll).
    """

    __slots__ = (
        "_backoff",
        "_budget_ns",
        "_cap",
        "_census",
        "_mean",
        "_skip",
        "budget",
        "hits",
        "misses",
        "sleeps",
    )

    def __init__(self, budget: float, census: Census) -> None:
        self.budget = budget
        self._budget_ns = int(budget * 1e9)
        self._census = census
        self._cap = budget * _CAP
        self._mean = self._cap  # a new connection proves itself fast before it is polled for
        self.hits = self.misses = self.sleeps = 0
        self._backoff = 0  # receives to skip after the next poll that finds the CPU shared
        self._skip = 0  # receives left to skip

    def recv_into(self, sock: socket.socket, buf: memoryview) -> int:
        """sock.recv_into(buf) on a blocking socket, polled first when that is likely to pay.
        The caller has let go of the server lock."""
        start = _clock()
        census = self._census
        if self._mean > self.budget or census.connection_threads > 1 or self._skip:
            if self._skip:
                self._skip -= 1
            self.sleeps += 1
            n = sock.recv_into(buf)
        else:
            n = self._poll(sock, buf, start)
        waited = _clock() - start
        self._mean += (min(waited, self._cap) - self._mean) * _WEIGHT
        return n

    def _poll(self, sock: socket.socket, buf: memoryview, start: float) -> int:
        assert recv_spin is not None  # available() said so
        cpu = _cpu()
        n = recv_spin(sock.fileno(), buf, self._budget_ns)
        self._judge(start, cpu)
        if n >= 0:
            self.hits += 1
            return n
        self.misses += 1
        return sock.recv_into(buf)

    def _judge(self, start: float, cpu: float) -> None:
        """After a poll: if this thread ran for less than most of it, other threads (the
        clients, on a busy machine) wanted the CPU it burned: skip polling for a while, twice
        as long each time in a row (up to _BACKOFF_MAX receives)."""
        wall = _clock() - start
        if wall < _JUDGED:
            return
        if _cpu() - cpu < wall * _SHARED:
            self._backoff = min(max(2 * self._backoff, 8), _BACKOFF_MAX)
            self._skip = self._backoff
        else:
            self._backoff = 0
