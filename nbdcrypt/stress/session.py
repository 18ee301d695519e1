"""One NBD connection of the stress tool: the sans-IO client codecs on an asyncio Protocol.

`open_session` connects (TCP or unix socket), runs the handshake and returns a Session in the
transmission phase, or raises SessionError with one clear line (cannot connect, refused export,
broken handshake, timeout). Requests go out with `submit` (those of one turn of the event loop
leave together, in one writev); each reply is handed to `on_reply` from data_received, in
arrival order, and a broken reply or a lost connection to `on_close`, once. Hostile clients
(abuse.py) use `transport` and `codec` directly to send half requests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import cast

from nbdcrypt.nbd import client_handshake as ch
from nbdcrypt.nbd.client_transmission import ClientTransmission, ProtocolError, Reply
from nbdcrypt.nbd.handshake import NEED_DATA
from nbdcrypt.stress.uri import NbdUri


class SessionError(Exception):
    """A connection that could not be made or set up; the message says why, in one line."""


def _ignore_reply(reply: Reply) -> None:
    pass


def _ignore_close(reason: str | None) -> None:
    pass


class Session(asyncio.Protocol):
    """A client connection: handshake first, then requests and replies."""

    transport: asyncio.Transport

    def __init__(self, uri: NbdUri, *, structured: bool) -> None:
        self.uri = uri
        self.handshake = ch.ClientHandshake(uri.export, structured_replies=structured)
        self.codec: ClientTransmission | None = None
        self.info: ch.ExportInfo | None = None
        self.ready: asyncio.Future[ch.ExportInfo] = asyncio.get_running_loop().create_future()
        self.on_reply: Callable[[Reply], None] = _ignore_reply
        self.on_close: Callable[[str | None], None] = _ignore_close
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = False  # we asked for the close: it is not an error
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._out: list[bytes | bytearray | memoryview] = []  # requests not yet handed over

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.codec is None:
            self.handshake.receive_data(data)
            self._handshake_events()
            return
        codec = self.codec
        codec.receive_data(data)
        on_reply = self.on_reply
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, ProtocolError):
                self._fail(f"protocol error: {event.reason}")
                return
            assert isinstance(event, Reply)
            on_reply(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()  # nothing waits to write into a closed connection
        if not self.ready.done():
            event = self.handshake.connection_lost()
            self._handshake_failed(event)
        elif not self._closing:
            self._closing = True
            reason = f"connection lost: {exc}" if exc else "the server closed the connection"
            self.on_close(reason)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # Handshake --------------------------------------------------------------------------------

    def _handshake_events(self) -> None:
        while not self.ready.done():
            event = self.handshake.next_event()
            out = self.handshake.data_to_send()
            if out:
                self.transport.write(out)
            if event is NEED_DATA:
                return
            if isinstance(event, ch.HandshakeDone):
                self.info = event.info
                self.codec = ClientTransmission(structured_replies=event.info.structured_replies)
                self.ready.set_result(event.info)
                if event.trailing:
                    self.data_received(event.trailing)
                return
            assert isinstance(event, ch.Refused | ch.ProtocolError)
            self._handshake_failed(event)
            self._closing = True
            self.transport.close()

    def _handshake_failed(self, event: ch.Event) -> None:
        if self.ready.done():
            return
        if isinstance(event, ch.Refused):
            message = f"{self.uri}: the server refused export {self.uri.export!r}: {event}"
        else:
            assert isinstance(event, ch.ProtocolError)
            message = f"{self.uri}: handshake failed: {event.reason}"
        self.ready.set_exception(SessionError(message))

    # Transmission -----------------------------------------------------------------------------

    def submit(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> int:
        """Send a request; its reply goes to on_reply. Returns its handle."""
        assert self.codec is not None
        handle, header = self.codec.request(cmd, offset, length, flags)
        if not self._out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._out.append(header)
        if payload is not None:
            self._out.append(payload)
        return handle

    def flush(self) -> None:
        """Hand the requests submitted so far to the transport, in one writev."""
        if self._out:
            out, self._out = self._out, []
            if not self.transport.is_closing():
                self.transport.writelines(out)

    @property
    def write_paused(self) -> bool:
        return not self._can_write.is_set()

    async def drain(self) -> None:
        """Wait while the transport's send buffer is above its high mark."""
        await self._can_write.wait()

    def _fail(self, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self.on_close(reason)
        self.transport.abort()

    async def disconnect(self) -> None:
        """NBD_CMD_DISC, then close (the soft disconnect)."""
        if not self._closing and self.codec is not None and not self.transport.is_closing():
            self._closing = True
            self.flush()
            self.transport.write(self.codec.disconnect())
            self.transport.close()
        await self.closed

    def close(self) -> None:
        """Close without NBD_CMD_DISC, after what is buffered has been sent."""
        self._closing = True
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        """Close at once, without NBD_CMD_DISC (a hard disconnect)."""
        self._closing = True
        self._out.clear()
        self.transport.abort()


async def open_session(uri: NbdUri, *, structured: bool = True, timeout: float = 30.0) -> Session:
    """Connect and finish the handshake, or raise SessionError."""
    loop = asyncio.get_running_loop()

    def factory() -> Session:
        return Session(uri, structured=structured)

    try:
        async with asyncio.timeout(timeout):
            if uri.socket is not None:
                _, session = await loop.create_unix_connection(factory, uri.socket)
            else:
                assert uri.host is not None
                _, session = await loop.create_connection(factory, uri.host, uri.port)
    except TimeoutError:
        raise SessionError(f"{uri}: cannot connect: no answer within {timeout:g} s") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SessionError(f"{uri}: cannot connect: {reason}") from None
    try:
        async with asyncio.timeout(timeout):
            await session.ready
    except TimeoutError:
        session.abort()
        raise SessionError(f"{uri}: no handshake within {timeout:g} s") from None
    except SessionError:
        session.abort()
        raise
    return session
