"""An asyncio event loop that shares one lock with the connection threads.

With `server.io: threads`, each connection's transmission runs on its own thread
(server/threaded.py). Devices, engines, keyslots and counters were written for one thread, so
every piece of Python that touches them runs under one lock: the loop holds it whenever it is
not waiting in epoll, and a connection thread takes it for each batch of requests it runs.
Socket reads and reply sends happen outside it. Plain `threading.Lock` suffices: the loop never
re-enters it, and a connection thread only takes it between its socket calls.

Work that a connection thread schedules on the loop (a future's callbacks, a task for a request
that has to wait, a timer) must wake the loop out of epoll: call_soon and call_at do that when
called from another thread, so the asyncio code below runs unchanged on either thread.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections.abc import Callable
from contextvars import Context
from typing import TypeVarTuple

from nbdcrypt import threadrole

_Ts = TypeVarTuple("_Ts")


class _LockedSelector(selectors.EpollSelector):
    """An epoll selector that lets go of the lock while it waits."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._lock = lock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:  # a poll: keep the lock
            return super().select(timeout)
        self._lock.release()
        try:
            return super().select(timeout)
        finally:
            self._lock.acquire()


class LockedLoop(asyncio.SelectorEventLoop):
    """The event loop of a server whose connections run on threads; `lock` guards its state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        super().__init__(_LockedSelector(self.lock))
        self.owner = 0  # the loop's thread while it runs
        # Connection threads running (changed under the lock; server/poll.py reads it without,
        # and busy-polls only for a server's one connection).
        self.connection_threads = 0

    def run_forever(self) -> None:
        self.lock.acquire()
        self.owner = threading.get_ident()
        threadrole.enter(self.lock, connection=False)
        try:
            super().run_forever()
        finally:
            threadrole.leave()
            self.owner = 0
            self.lock.release()

    def call_soon(
        self,
        callback: Callable[[*_Ts], object],
        *args: *_Ts,
        context: Context | None = None,
    ) -> asyncio.Handle:
        handle = super().call_soon(callback, *args, context=context)
        if threading.get_ident() != self.owner:
            self._write_to_self()  # type: ignore[attr-defined]  # wake epoll: work is ready
        return handle

    def call_at(
        self,
        when: float,
        callback: Callable[[*_Ts], object],
        *args: *_Ts,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        handle = super().call_at(when, callback, *args, context=context)
        if threading.get_ident() != self.owner:
            self._write_to_self()  # type: ignore[attr-defined]  # epoll's timeout may be longer
        return handle


def become_connection_thread(loop: LockedLoop) -> None:
    """Called first on a connection thread: the asyncio code it runs finds `loop`, and its
    devices let go of the lock for their system calls."""
    asyncio.events._set_running_loop(loop)
    threadrole.enter(loop.lock, connection=True)
