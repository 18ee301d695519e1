"""Moving a large write payload from a connection's socket to a backing file with splice(2).

Why (docs/ARCHITECTURE.md, "Spliced writes"): a payload read with recv() and written with
pwrite() is copied twice, socket to buffer and buffer to page cache. Spliced through a pipe it
is copied once: the socket's pages move into the pipe by reference, and only the pipe-to-file
step copies: an eighth of the server's CPU on a sequential write, measured.

A PayloadSplicer belongs to one connection thread: it owns a pipe (1 MiB where the system
allows, else the default) and moves one payload at a time, with no lock held. Where the file
refuses the bytes, the rest of the payload is still taken off the socket (the next request
follows it) and thrown away, and the error is returned for the request's reply. The loop runs
in C (_splice.c, the GIL let go once per payload) when the module is built, else here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from nbdcrypt.device import Sealing

try:
    from nbdcrypt.server._splice import splice_payload
except ImportError:  # not built (no compiler at install): the same loop in Python
    splice_payload = None  # type: ignore[assignment]

PIPE_SIZE = 1 << 20  # the most one socket-to-pipe call moves (a 256 KiB payload in one)


class SpliceTarget(NamedTuple):
    """A write payload the connection thread moves from the socket to a file itself: by
    splice, or (a sealed write: `begin` set) received into `buffer`, then encrypted in place
    and written as `begin()` says (device.SealTarget)."""

    length: int
    fd: int
    offset: int
    reply: bytes  # its reply once it landed
    buffer: memoryview | None = None
    begin: Callable[[], Sealing | None] | None = None


class PayloadSplicer:
    """Moves payloads from a socket to files through a pipe of its own."""

    def __init__(self, *, native: bool = True) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        try:
            self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # for refused bytes
        except OSError:
            os.close(self._read)
            os.close(self._write)
            raise
        with contextlib.suppress(OSError):  # over the user's pipe quota: the default size
            fcntl.fcntl(self._write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.size = fcntl.fcntl(self._write, fcntl.F_GETPIPE_SZ)
        self.native = native and splice_payload is not None

    def move(self, sock: int, length: int, fd: int, offset: int) -> OSError | None:
        """Move the next `length` bytes of `sock` to `fd` at `offset`.

        Returns None, or the file's error (the whole payload is taken off the socket even
        then). Raises EOFError if the socket ends first, OSError for the socket's own errors.
        """
        if self.native:
            args = (self._read, self._write, self.size, self._null, fd, offset, length)
            result = splice_payload(sock, *args)
        else:
            result = self._move(sock, length, fd, offset)
        if result < 0:
            raise EOFError("the client closed the connection inside a write payload")
        return OSError(result, os.strerror(result)) if result else None

    def _move(self, sock: int, length: int, fd: int, offset: int) -> int:
        """_splice.c's loop: 0, the file's errno, or -1 if the socket ended first."""
        failed = 0
        while length:
            n = os.splice(sock, self._write, min(length, self.size))
            if not n:
                return -1
            length -= n
            moved = 0
            if not failed:
                moved, failed = self._to_file(fd, offset, n)
                offset += moved
            if moved < n:  # the file refused some: the rest of this piece goes nowhere
                self._discard(n - moved)
        return failed

    def _to_file(self, fd: int, offset: int, n: int) -> tuple[int, int]:
        """Write the `n` bytes the pipe holds to `fd` at `offset`: (bytes moved, errno)."""
        moved = 0
        while moved < n:
            try:
                done = os.splice(self._read, fd, n - moved, offset_dst=offset + moved)
            except OSError as exc:
                return moved, exc.errno or errno.EIO
            if not done:  # nothing written though the pipe holds bytes
                return moved, errno.EIO
            moved += done
        return moved, 0

    def _discard(self, n: int) -> None:
        """Throw away `n` bytes the pipe holds (to /dev/null)."""
        while n:
            done = os.splice(self._read, self._null, n)
            if not done:
                raise OSError(errno.EIO, "splice: the pipe ran dry")
            n -= done

    def close(self) -> None:
        for fd in (self._read, self._write, self._null):
            if fd >= 0:
                os.close(fd)
        self._read = self._write = self._null = -1
