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
        self.unlocked = _Unlocked(self.lock)

    def run_forever(self) -> None:
        self.lock.acquire()
        self.owner = threading.get_ident()
        try:
            super().run_forever()
        finally:
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


class _Unlocked:
    """Lets go of a held lock for a blocking call: `with unlocked(): os.pwritev(...)`."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.release()

    def __exit__(self, *exc: object) -> None:
        self._lock.acquire()


class _Held:
    __slots__ = ()

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


_HELD = _Held()


def unlocked() -> _Unlocked | _Held:
    """Around a blocking system call in a device: let other connections run meanwhile.

    Under a LockedLoop, code that runs with the loop set as running (the loop's callbacks, a
    connection thread's requests) holds the lock; letting it go for a syscall is no different
    from an await. Elsewhere (uvloop, executor threads) it does nothing.
    """
    loop = asyncio.events._get_running_loop()
    if type(loop) is LockedLoop:
        return loop.unlocked
    return _HELD


def on_connection_thread() -> bool:
    """True on a connection thread, where a blocking call stalls only its own client."""
    loop = asyncio.events._get_running_loop()
    return type(loop) is LockedLoop and threading.get_ident() != loop.owner
