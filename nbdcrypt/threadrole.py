"""Which thread holds the server's lock, and how code deep below lets go of it.

With `server.io: threads` (server/lockedloop.py, server/threaded.py) the event loop's thread
and each connection thread run the server's code holding one lock. Code far below them, a
backing file's pread or a cipher's C call, lets go of it around a blocking or long call that
touches only its own buffers (`with unlocked(): ...`), which is no different from an await.
This module is what that code imports: it knows nothing of event loops or sockets.
"""

from __future__ import annotations

import threading


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


class _ThreadRole(threading.local):
    """What the current thread is to a LockedLoop: how it lets go of the lock, if it holds
    it while running the server's code, and whether it is a connection thread."""

    unlocked: _Unlocked | _Held = _HELD
    connection = False


_ROLE = _ThreadRole()  # per thread: set by the loop while it runs, and by connection threads


UNLOCK_MIN = 64 * 1024  # a page-cache copy smaller than this is cheaper than a lock hand-off


def unlocked(nbytes: int | None = None) -> _Unlocked | _Held:
    """Around a blocking or long call on private buffers: let other connections run.

    The loop's thread (while it runs) and the connection threads hold the lock whenever they
    run the server's code. Elsewhere (uvloop, executor threads) this does nothing; nor for a
    copy of `nbytes` under UNLOCK_MIN, which takes less than letting another thread in.
    """
    if nbytes is not None and nbytes < UNLOCK_MIN:
        return _HELD
    return _ROLE.unlocked


def on_connection_thread() -> bool:
    """True on a connection thread, where a blocking call stalls only its own client."""
    return _ROLE.connection


def enter(lock: threading.Lock, *, connection: bool) -> None:
    """This thread holds `lock` while it runs the server's code from now on."""
    _ROLE.unlocked = _Unlocked(lock)
    _ROLE.connection = connection


def leave() -> None:
    """This thread no longer runs the server's code under a lock."""
    _ROLE.unlocked = _HELD
    _ROLE.connection = False
