"""Busy-polling a connection thread's socket for the next request, where that beats sleeping.

Why (docs/ARCHITECTURE.md, "Busy polling"): a thread that sleeps in recv() lets its vCPU halt.
The client's next request must then wake it: an interrupt to the halted vCPU and a VM entry,
after which the first request runs on cold caches. A client at queue depth 1 pays that on
every request, and a Python server pays it more than a C one (measured here: 108 us per 4 KiB
read sleeping, 56 us polling, nbdkit 65-75 us). Polling the socket for a few tens of
microseconds after a reply keeps the vCPU awake for a request that is that close, as
net.core.busy_poll does for network sockets and io_poll for NVMe queues.

When: only after a read that brought one small request and nothing more (a client that waits
for each reply; pipelining and large transfers are throughput work, where a polling thread
takes the CPU its client needs), only while no other connection thread of the server is
running, and only while this connection's recent waits of that kind were within the budget
(a weighted mean): an idle or slow client is never polled for, and a fast one that comes back
is polled for again within a few requests.
"""

from __future__ import annotations

import socket
import time
from typing import Protocol

_DONTWAIT = socket.MSG_DONTWAIT
_clock = time.monotonic
_CAP = 8  # a wait counts as at most this many budgets: a long idle spell is forgotten quickly
_WEIGHT = 0.25  # of the newest wait in the mean


class Census(Protocol):
    """How many connection threads are running requests (not waiting for their client)."""

    active_threads: int


class SocketPoller:
    """Receives a connection's next bytes, polling for up to `budget` seconds before sleeping.

    Its counters: `hits` (receives that polling served), `misses` (polls that ran out of budget
    or gave way to another thread, then slept), `sleeps` (receives that did not poll).
    """

    __slots__ = ("_cap", "_census", "_mean", "budget", "hits", "misses", "sleeps")

    def __init__(self, budget: float, census: Census) -> None:
        self.budget = budget
        self._census = census
        self._cap = budget * _CAP
        self._mean = self._cap  # a new connection proves itself fast before it is polled for
        self.hits = self.misses = self.sleeps = 0

    def recv_into(self, sock: socket.socket, buf: memoryview) -> int:
        """sock.recv_into(buf) on a blocking socket, polled first when that is likely to pay.
        The caller has let go of the server lock."""
        start = _clock()
        if self._mean > self.budget or self._census.active_threads:
            self.sleeps += 1
            n = sock.recv_into(buf)
        else:
            n = self._poll(sock, buf, start)
        waited = _clock() - start
        self._mean += (min(waited, self._cap) - self._mean) * _WEIGHT
        return n

    def _poll(self, sock: socket.socket, buf: memoryview, start: float) -> int:
        end = start + self.budget
        census = self._census
        while True:
            try:
                n = sock.recv_into(buf, 0, _DONTWAIT)
            except BlockingIOError:
                if _clock() < end and not census.active_threads:
                    continue
                self.misses += 1
                return sock.recv_into(buf)
            self.hits += 1
            return n
