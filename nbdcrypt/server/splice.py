"""Moving a large write payload from a connection's socket to a backing file with splice(2).

Why (docs/ARCHITECTURE.md, "Spliced writes"): a payload read with recv() and written with
pwrite() is copied twice, socket to buffer and buffer to page cache. Spliced through a pipe it
is copied once: the socket's pages move into the pipe by reference, and only the pipe-to-file
step copies. On a sequential write that is a third of the server's CPU per byte.

A PayloadSplicer belongs to one connection thread: it owns a pipe (1 MiB where the system
allows, else the default) and moves one payload at a time, with no lock held. Where the file
refuses the bytes, the rest of the payload is still taken off the socket (the next request
follows it) and thrown away, and the error is returned for the request's reply.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

PIPE_SIZE = 1 << 20  # bytes in flight in the pipe: four 256 KiB payloads


class PayloadSplicer:
    """Moves payloads from a socket to files through a pipe of its own."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # over the user's pipe quota: the default size
            fcntl.fcntl(self._write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.size = fcntl.fcntl(self._write, fcntl.F_GETPIPE_SZ)
        self._null = -1  # /dev/null, opened when a payload must be thrown away

    def move(self, sock: int, length: int, fd: int, offset: int) -> OSError | None:
        """Move the next `length` bytes of `sock` to `fd` at `offset`.

        Returns None, or the file's error (the whole payload is taken off the socket even
        then). Raises EOFError if the socket ends first, OSError for the socket's own errors.
        """
        error: OSError | None = None
        while length:
            n = os.splice(sock, self._write, min(length, self.size))
            if not n:
                raise EOFError("the client closed the connection inside a write payload")
            length -= n
            if error is None:
                try:
                    self._to_file(fd, offset, n)
                except OSError as exc:
                    error = exc
                    self._discard_pipe()
                offset += n
            else:
                self._discard(n)
        return error

    def _to_file(self, fd: int, offset: int, n: int) -> None:
        """Write the `n` bytes the pipe holds to `fd` at `offset`."""
        while n:
            done = os.splice(self._read, fd, n, offset_dst=offset)
            if not done:  # cannot happen while the pipe holds bytes and has a writer
                raise OSError(5, "splice to the backing file wrote nothing")
            n -= done
            offset += done

    def _discard_pipe(self) -> None:
        """Throw away whatever the pipe still holds (after the file refused some of it)."""
        while True:
            try:
                self._discard(self.size, os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                return

    def _discard(self, n: int, flags: int = 0) -> None:
        """Throw away `n` bytes the pipe holds (or fewer, with SPLICE_F_NONBLOCK)."""
        if self._null < 0:
            self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        while n:
            done = os.splice(self._read, self._null, n, flags=flags)
            if not done:
                return
            n -= done

    def close(self) -> None:
        for fd in (self._read, self._write, self._null):
            if fd >= 0:
                os.close(fd)
        self._read = self._write = self._null = -1
