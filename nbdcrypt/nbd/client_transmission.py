"""The client side of NBD's transmission phase, with no I/O: requests out, replies in.

The mirror of transmission.py. `request` registers a request and returns its 28-byte header
(a WRITE's payload is sent after it by the caller, uncopied). Bytes from the server go in with
`receive_data`; `next_event` gives one `Reply` per request when its simple reply, or the chunk
of its structured reply with NBD_REPLY_FLAG_DONE, has arrived. A READ's chunks are assembled
into its data: OFFSET_DATA copied to its place, OFFSET_HOLE left as zeroes.

What the spec calls a broken reply ends the connection with a `ProtocolError`: a bad magic, a
handle that is not in flight, a structured reply that was not negotiated, a simple reply to a
READ when structured replies were, content chunks outside the request or overlapping each
other, a READ declared successful without chunks covering all of it, a chunk type unknown
without bit 15 (unknown types with it are errors of that request, as the spec says), a NONE
chunk without DONE or with a payload, an error chunk with error 0 or a message that does not
fit. After a ProtocolError nothing more is parsed.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

from nbdcrypt.nbd.constants import (
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    ReplyType,
)
from nbdcrypt.nbd.handshake import (
    NEED_DATA,  # one sentinel for every codec
    _NeedData,
)

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_ERROR_BIT = 1 << 15
MAX_CHUNK = 64 * 1024 * 1024  # a longer chunk than any READ this client sends is a broken server
_COMPACT = 1024 * 1024  # consumed input is dropped from the buffer once this much piles up


def encode_request(cmd: int, flags: int, handle: int, offset: int, length: int) -> bytes:
    """A request header: magic, flags, type, handle, offset, length."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)


_CONSUMED = _NeedData()  # a chunk was taken in, and its reply is not complete yet


@dataclass(slots=True)
class Reply:
    """The whole answer to one request. `error` is 0 on success, else the first error the
    server reported; `data` is a successful READ's bytes (None otherwise)."""

    handle: int
    cmd: int
    offset: int
    length: int
    error: int = 0
    message: str = ""
    data: bytearray | None = None
    error_offset: int | None = None  # from NBD_REPLY_TYPE_ERROR_OFFSET
    hole_bytes: int = 0  # READ bytes that came as OFFSET_HOLE
    chunks: int = 0  # structured chunks received (0 for a simple reply)


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The server broke the transmission protocol; hard-disconnect."""

    reason: str


Event = Reply | ProtocolError


@dataclass(slots=True)
class _Pending:
    """A request in flight and, for a structured READ, the chunks seen so far."""

    cmd: int
    offset: int
    length: int
    data: bytearray | None = None
    starts: list[int] = field(default_factory=list)  # covered ranges, sorted by start
    ends: list[int] = field(default_factory=list)
    covered: int = 0
    reply: Reply | None = None


class ClientTransmission:
    """One connection's requests and the replies to them."""

    def __init__(self, *, structured_replies: bool, first_handle: int = 1) -> None:
        self.structured = structured_replies
        self._pending: dict[int, _Pending] = {}
        self._next_handle = first_handle
        self._buf = bytearray()
        self._pos = 0
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        *,
        handle: int | None = None,
    ) -> tuple[int, bytes]:
        """Register a request; returns its handle and header. A WRITE's `length` payload
        bytes must follow the header on the wire."""
        if handle is None:
            handle = self._next_handle
            self._next_handle += 1
        if handle in self._pending:
            raise ValueError(f"handle {handle} is already in flight")
        self._pending[handle] = _Pending(cmd, offset, length)
        return handle, encode_request(cmd, flags, handle, offset, length)

    @staticmethod
    def disconnect() -> bytes:
        """NBD_CMD_DISC: no reply comes, and nothing may be sent after it."""
        return encode_request(Cmd.DISC, 0, 0, 0, 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        if self._pos >= _COMPACT or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | _NeedData:
        """The next complete reply, a ProtocolError, or NEED_DATA."""
        while not self.closed:
            have = len(self._buf) - self._pos
            if have < 4:
                return NEED_DATA
            (magic,) = struct.unpack_from(">I", self._buf, self._pos)
            if magic == SIMPLE_REPLY_MAGIC:
                event = self._simple(have)
            elif magic == STRUCTURED_REPLY_MAGIC:
                event = self._chunk(have)
            else:
                event = self._fail(f"bad reply magic {magic:#x}")
            if event is not _CONSUMED:
                return event
        return NEED_DATA

    # Simple replies ---------------------------------------------------------------------------

    def _simple(self, have: int) -> Event | _NeedData:
        if have < _SIMPLE.size:
            return NEED_DATA
        _, error, handle = _SIMPLE.unpack_from(self._buf, self._pos)
        pending = self._pending.get(handle)
        if pending is None:
            return self._fail(f"a simple reply for handle {handle}, which is not in flight")
        is_read = pending.cmd == Cmd.READ
        if is_read and self.structured:
            return self._fail("a simple reply to a READ, with structured replies negotiated")
        reply = Reply(handle, pending.cmd, pending.offset, pending.length, error=error)
        if is_read and not error:
            end = self._pos + _SIMPLE.size + pending.length
            if len(self._buf) < end:
                return NEED_DATA
            reply.data = self._buf[self._pos + _SIMPLE.size : end]
            self._pos = end
        else:
            self._pos += _SIMPLE.size
        del self._pending[handle]
        return reply

    # Structured replies -----------------------------------------------------------------------

    def _chunk(self, have: int) -> Event | _NeedData:
        if have < _CHUNK.size:
            return NEED_DATA
        _, flags, rtype, handle, length = _CHUNK.unpack_from(self._buf, self._pos)
        if not self.structured:
            return self._fail(
                "a structured reply chunk, but structured replies were not negotiated"
            )
        pending = self._pending.get(handle)
        if pending is None:
            return self._fail(f"a reply chunk for handle {handle}, which is not in flight")
        if length > MAX_CHUNK:
            return self._fail(f"a reply chunk of {length} bytes")
        start = self._pos + _CHUNK.size
        if len(self._buf) < start + length:
            return NEED_DATA
        self._pos = start + length
        with memoryview(self._buf) as view:
            problem = self._apply(pending, flags, rtype, view[start : start + length])
        if problem:
            return self._fail(problem)
        if not flags & REPLY_FLAG_DONE:
            return _CONSUMED
        del self._pending[handle]
        return self._finish(handle, pending)

    def _apply(self, p: _Pending, flags: int, rtype: int, payload: memoryview) -> str:
        """Take one chunk into the pending reply; a protocol problem as text, or ''."""
        reply = p.reply
        if reply is None:
            reply = p.reply = Reply(0, p.cmd, p.offset, p.length)
        reply.chunks += 1
        if rtype == ReplyType.NONE:
            if payload.nbytes:
                return f"a NONE chunk with {payload.nbytes} bytes of payload"
            if not flags & REPLY_FLAG_DONE:
                return "a NONE chunk without NBD_REPLY_FLAG_DONE"
            return ""
        if rtype in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
            if p.cmd != Cmd.READ:
                return f"a content chunk in the reply to command {p.cmd}"
            return self._content(p, reply, rtype, payload)
        if rtype & _ERROR_BIT:
            return self._error(p, reply, rtype, payload)
        return f"a reply chunk of unknown type {rtype}"

    def _content(self, p: _Pending, reply: Reply, rtype: int, payload: memoryview) -> str:
        if rtype == ReplyType.OFFSET_DATA:
            if payload.nbytes < 9:
                return f"an OFFSET_DATA chunk of {payload.nbytes} bytes"
            (offset,) = _U64.unpack_from(payload)
            size = payload.nbytes - 8
        else:
            if payload.nbytes != 12:
                return f"an OFFSET_HOLE chunk of {payload.nbytes} bytes"
            offset, size = _HOLE.unpack_from(payload)
            if not size:
                return "an OFFSET_HOLE chunk of 0 bytes"
        at = offset - p.offset
        if offset < p.offset or at + size > p.length:
            return f"a content chunk at {offset}+{size}, outside the READ of {p.offset}+{p.length}"
        problem = _claim(p, at, at + size)
        if problem:
            return problem
        if p.data is None:
            p.data = bytearray(p.length)
        if rtype == ReplyType.OFFSET_DATA:
            p.data[at : at + size] = payload[8:]
        else:  # the buffer starts as zeroes, and no chunk overlaps another
            reply.hole_bytes += size
        return ""

    def _error(self, p: _Pending, reply: Reply, rtype: int, payload: memoryview) -> str:
        if payload.nbytes < 6:
            return f"an error chunk of {payload.nbytes} bytes"
        error, msg_len = _ERROR.unpack_from(payload)
        if not error:
            return "an error chunk with error 0"
        if rtype == ReplyType.ERROR_OFFSET:
            if payload.nbytes != 14 + msg_len:
                return (
                    f"an ERROR_OFFSET chunk of {payload.nbytes} bytes with a {msg_len}-byte message"
                )
            (offset,) = _U64.unpack_from(payload, 6 + msg_len)
            if not p.offset <= offset < p.offset + max(p.length, 1):
                return f"an error offset {offset} outside the request"
            if reply.error_offset is None:
                reply.error_offset = offset
        elif msg_len > payload.nbytes - 6:
            return f"an error message of {msg_len} bytes in a {payload.nbytes}-byte chunk"
        if not reply.error:
            reply.error = error
            reply.message = bytes(payload[6 : 6 + msg_len]).decode("utf-8", "replace")
        return ""

    def _finish(self, handle: int, p: _Pending) -> Event:
        reply = p.reply
        assert reply is not None
        reply.handle = handle
        if p.cmd == Cmd.READ and not reply.error:
            if p.covered != p.length:
                return self._fail(
                    f"READ {p.offset}+{p.length} ended successfully with {p.covered} bytes"
                )
            reply.data = p.data if p.data is not None else bytearray(p.length)
        return reply

    def _fail(self, reason: str) -> ProtocolError:
        self.closed = True
        self._buf.clear()
        self._pos = 0
        return ProtocolError(reason)


def _claim(p: _Pending, start: int, end: int) -> str:
    """Record [start, end) of a READ as received; '' or why it overlaps an earlier chunk."""
    i = bisect.bisect_right(p.starts, start)
    if i and p.ends[i - 1] > start:
        return f"content chunks overlap at {p.offset + start}"
    if i < len(p.starts) and p.starts[i] < end:
        return f"content chunks overlap at {p.offset + p.starts[i]}"
    p.starts.insert(i, start)
    p.ends.insert(i, end)
    p.covered += end - start
    return ""
