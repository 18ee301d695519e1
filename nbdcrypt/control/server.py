"""The control socket: a unix socket in the running server that `nbdcrypt ctl` talks to.

The socket file is created with mode 0600 (bound under a umask of 0177, so it is never wider,
not even for a moment) and removed when the server stops. A stale socket file (nobody listens)
is replaced; a live one belongs to another server and is refused.

Each client sends request lines and reads one reply line per request, in order. Requests of one
client run one after another; requests of different clients run concurrently, so a `resume`
from a second client can release I/O that a first client's `suspend` is waiting on. A client
that sends nothing for `idle_timeout` seconds is disconnected (a command that takes long, like a
suspend that drains, does not count as idle). A line longer than `max_line` gets an error reply
and the connection is closed, since what follows cannot be framed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

from nbdcrypt.control.commands import ControlError, Controller
from nbdcrypt.control.protocol import (
    IDLE_TIMEOUT,
    MAX_LINE,
    ProtocolError,
    error_reply,
    ok_reply,
    parse_request,
)

log = logging.getLogger("nbdcrypt.control")


class ControlServer:
    def __init__(
        self,
        controller: Controller,
        path: Path,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_line: int = MAX_LINE,
    ) -> None:
        self.controller = controller
        self.path = path
        self.idle_timeout = idle_timeout
        self.max_line = max_line
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = _bind_private(self.path)
        try:
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._client, sock=sock, limit=self.max_line
            )
        except BaseException:
            sock.close()
            self._remove()
            raise
        log.info("control socket at %s", self.path)

    async def close(self) -> None:
        """Stop listening, end the clients (commands in progress are cancelled), remove the file."""
        if self._server is not None:
            self._server.close()
        self._remove()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)

    def _remove(self) -> None:
        """Remove the socket file if it is still ours (not one a later server put there)."""
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError) as exc:
            log.debug("control client: %s", exc)
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
            except TimeoutError:
                log.info("control client idle for %gs, disconnecting", self.idle_timeout)
                return
            except ValueError:  # the limit: no newline within max_line bytes
                writer.write(error_reply(f"request line longer than {self.max_line} bytes"))
                await writer.drain()
                return
            if not line:
                return
            if line.strip():
                writer.write(await self.handle(line))
                await writer.drain()

    async def handle(self, line: bytes) -> bytes:
        """One request line -> one reply line."""
        try:
            request = parse_request(line)
            output = await self.controller.execute(request)
        except (ProtocolError, ControlError) as exc:
            log.info("request refused: %s", exc)
            return error_reply(str(exc))
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("unexpected error in a control request")
            return error_reply(f"internal error: {type(exc).__name__}: {exc}")
        return ok_reply(output)


def _bind_private(path: Path) -> socket.socket:
    """A unix socket bound at `path` with mode 0600, replacing a stale socket file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"control socket {path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens on it
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"control socket {path}: another server is listening on it")
