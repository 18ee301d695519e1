"""NBD transmission phase without I/O: requests in (bytes -> commands), replies out (bytes).

Rules of this file: every rule of the spec about which request is valid lives here, applied
once before any device sees a request: unknown commands and flags, flags that do not belong to
a command or were not advertised, ranges past the end, writes to a read-only export, lengths
above the maximum block size. An invalid request becomes a `BadCommand` carrying the error the
spec names (its payload, if any, is consumed and dropped), so the connection goes on. Only a
broken framing (bad magic) ends the session, because nothing after it can be trusted.

Hot path: `feed` parses every complete request in one pass over the received bytes. A write's
payload is a zero-copy view into the received bytes when it arrived whole, else one buffer of
its final size is filled as the bytes arrive.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

from nbdcrypt.nbd.constants import (
    MAX_PAYLOAD,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyType,
    TransmissionFlag,
    wire_string,
)

_REQUEST = struct.Struct(">IHHQQI")
_REQUEST_SIZE = _REQUEST.size  # 28
REQUEST_SIZE = _REQUEST_SIZE  # a request header, without its payload
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # chunk header + offset
_HOLE_CHUNK = struct.Struct(">IHHQIQI")  # chunk header + offset + hole length
_ERROR_CHUNK = struct.Struct(">IHHQIIH")  # chunk header + error + message length
_EXTENT = struct.Struct(">II")

_WRITE_LIKE = frozenset((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
_ENOSPC_PAST_END = frozenset((Cmd.WRITE, Cmd.WRITE_ZEROES))
_NEEDS_LENGTH = frozenset(
    (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS)
)


RECYCLE_BYTES = 2 * 1024 * 1024  # recycled payload buffers kept per connection, at most
_make = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)
_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)


class Command(NamedTuple):
    """A valid request. `payload` is set for WRITE only."""

    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    payload: bytes | bytearray | memoryview | None


class BadCommand(NamedTuple):
    """A request to fail with `error` without touching the export."""

    cmd: int
    handle: int
    error: Errno
    message: str


class Disconnect(NamedTuple):
    """NBD_CMD_DISC: finish what is in flight, then close."""

    handle: int


class FramingError(NamedTuple):
    """The byte stream is no longer a sequence of requests: close the connection."""

    reason: str


Event = Command | BadCommand | Disconnect | FramingError


def _allowed_flags(tflags: int) -> dict[int, int]:
    """Command -> the command flags a client may set, given the advertised transmission flags."""
    fua = CmdFlag.FUA if tflags & TransmissionFlag.SEND_FUA else 0
    df = CmdFlag.DF if tflags & TransmissionFlag.SEND_DF else 0
    fast = CmdFlag.FAST_ZERO if tflags & TransmissionFlag.SEND_FAST_ZERO else 0
    allowed = {
        Cmd.READ: fua | df,
        Cmd.WRITE: fua,
        Cmd.DISC: fua,  # the spec: FUA is valid on every command once advertised
        Cmd.FLUSH: fua,
        Cmd.TRIM: fua,
        Cmd.CACHE: fua,
        Cmd.WRITE_ZEROES: fua | CmdFlag.NO_HOLE | fast,
        Cmd.BLOCK_STATUS: fua | CmdFlag.REQ_ONE,
    }
    return {int(cmd): int(flags) for cmd, flags in allowed.items()}


def _supported_commands(tflags: int, block_status: bool) -> frozenset[int]:
    cmds = {Cmd.READ, Cmd.WRITE, Cmd.DISC}
    optional = (
        (TransmissionFlag.SEND_FLUSH, Cmd.FLUSH),
        (TransmissionFlag.SEND_TRIM, Cmd.TRIM),
        (TransmissionFlag.SEND_CACHE, Cmd.CACHE),
        (TransmissionFlag.SEND_WRITE_ZEROES, Cmd.WRITE_ZEROES),
    )
    cmds.update(cmd for flag, cmd in optional if tflags & flag)
    if block_status:
        cmds.add(Cmd.BLOCK_STATUS)
    return frozenset(cmds)


class RequestParser:
    """Turns the client's bytes into validated commands for one export."""

    def __init__(
        self,
        *,
        size: int,
        transmission_flags: int,
        block_status: bool,
        min_block: int = 1,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.size = size
        self.readonly = bool(transmission_flags & TransmissionFlag.READ_ONLY)
        self.min_block = min_block
        self.max_payload = max_payload
        self._allowed = _allowed_flags(transmission_flags)
        self._supported = _supported_commands(transmission_flags, block_status)
        self._block_status = block_status
        self._fast = self._fast_rules()
        self._tail = b""  # an incomplete request header
        self._payload: bytearray | None = None  # a write payload being filled
        self._filled = 0
        self._header: tuple[int, int, int, int, int] | None = None  # cmd, flags, handle, off, len
        self._drop = 0  # bytes of a refused write's payload still to skip
        self._drop_event: BadCommand | None = None
        self._free: dict[int, list[bytearray]] = {}  # recycled payload buffers, by size
        self._free_bytes = 0
        self.closed = False

    def _fast_rules(self) -> dict[int, tuple[int, int]]:
        """Command -> (flags it must not carry, longest length) for requests that need no
        further check when in range and aligned; the rest go through _check."""
        rules = {}
        for cmd in self._supported & _NEEDS_LENGTH:
            if cmd in _WRITE_LIKE and self.readonly:
                continue
            longest = self.max_payload if cmd in (Cmd.READ, Cmd.WRITE) else 0xFFFFFFFF
            rules[int(cmd)] = (~self._allowed[cmd] & 0xFFFF, longest)
        return rules

    @property
    def pending_payload(self) -> int:
        """Bytes of a partly received write payload held by the parser."""
        return 0 if self._payload is None else len(self._payload)

    def _buffer(self, length: int) -> bytearray:
        """A buffer for a write payload: a recycled one of that size, or a new one."""
        free = self._free.get(length)
        if free:
            self._free_bytes -= length
            return free.pop()
        return bytearray(length)

    def recycle(self, payload: bytearray) -> None:
        """Give back the buffer of a write payload the device is done with, for reuse."""
        size = len(payload)
        if self._free_bytes + size <= RECYCLE_BYTES:
            free = self._free.get(size)
            if free is None:
                self._free[size] = [payload]
            else:
                free.append(payload)
            self._free_bytes += size

    def close(self) -> None:
        """The connection is gone: parse nothing more, and let go of the payload being filled
        and the recycled buffers at once (a vanished client's half write may be 32 MiB)."""
        self.closed = True
        self._payload = self._header = None
        self._tail = b""
        self._free.clear()
        self._free_bytes = 0

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of a partly received write payload goes, for callers that can read
        from the socket straight into it (then call payload_received); None if none pends."""
        if self._payload is None:
            return None
        return memoryview(self._payload)[self._filled :]

    def unstarted_write(self) -> tuple[int, int, int, int, int] | None:
        """(cmd, flags, handle, offset, length) of the accepted write whose payload is next on
        the wire, none of it received yet; else None."""
        return self._header if self._payload is not None and not self._filled else None

    def payload_taken(self) -> tuple[int, int, int, int, int]:
        """The caller took unstarted_write()'s payload off the wire itself (spliced it to the
        device): the write is the caller's to run; the parser reads the next request."""
        assert self._payload is not None and self._header is not None and not self._filled
        header = self._header
        self.recycle(self._payload)
        self._payload = self._header = None
        return header

    def payload_received(self, nbytes: int) -> list[Event]:
        """`nbytes` more of the pending payload were written into payload_buffer()."""
        assert self._payload is not None and self._header is not None
        self._filled += nbytes
        if self._filled < len(self._payload):
            return []
        payload, header = self._payload, self._header
        self._payload = self._header = None
        return [_make(Command, (*header, payload))]

    def feed_header(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """feed() for exactly one request header (the first REQUEST_SIZE bytes of `data`,
        which the caller reuses): the same events, with less work for the usual valid one."""
        if self._payload is not None or self._drop or self._tail or self.closed:
            return self.feed(memoryview(data)[:_REQUEST_SIZE], reused=True)
        header = _REQUEST.unpack_from(data)
        magic, flags, cmd, _, offset, length = header
        rule = self._fast.get(cmd)
        if (
            magic != REQUEST_MAGIC
            or rule is None
            or flags & rule[0]
            or not 0 < length <= rule[1]
            or offset + length > self.size
            or (offset | length) & (self.min_block - 1)
        ):
            return self.feed(memoryview(data)[:_REQUEST_SIZE], reused=True)
        if cmd != _WRITE:
            return [_make(Command, (cmd, flags, header[3], offset, length, None))]
        self._payload, self._filled = self._buffer(length), 0
        self._header = (cmd, flags, header[3], offset, length)
        return []

    def feed(self, data: bytes | bytearray | memoryview, *, reused: bool = False) -> list[Event]:
        """Parse `data` (appended to what came before) into events, in order.

        `reused`: the caller will overwrite `data` afterwards, so payloads are copied out of it
        (otherwise a payload that arrived whole is a zero-copy view of `data`).
        """
        events: list[Event] = []
        if self.closed:
            return events
        view = memoryview(data)
        pos = 0
        if self._payload is not None or self._drop:
            pos = self._continue_payload(view, events)
            if pos < 0:
                return events
        if self._tail:
            need = _REQUEST_SIZE - len(self._tail)
            if len(data) - pos < need:
                self._tail += bytes(view[pos:])
                return events
            data = self._tail + bytes(view[pos:])
            self._tail = b""
            view = memoryview(data)
            pos = 0
        end = len(data)
        unpack = _REQUEST.unpack_from
        fast = self._fast
        size, misaligned = self.size, self.min_block - 1
        append = events.append
        while end - pos >= _REQUEST_SIZE:
            magic, flags, cmd, handle, offset, length = unpack(data, pos)
            pos += _REQUEST_SIZE
            if magic != REQUEST_MAGIC:
                self.closed = True
                append(FramingError(f"bad request magic {magic:#x}"))
                return events
            rule = fast.get(cmd)
            valid = (
                rule is not None
                and not flags & rule[0]
                and 0 < length <= rule[1]
                and offset + length <= size
                and not (offset | length) & misaligned
            )
            if cmd != _WRITE:
                if valid:
                    append(_make(Command, (cmd, flags, handle, offset, length, None)))
                elif (error := self._check(cmd, flags, handle, offset, length)) is not None:
                    append(error)
                elif cmd == _DISC:
                    append(Disconnect(handle))
                else:
                    append(Command(cmd, flags, handle, offset, length, None))
                continue
            if valid and end - pos >= length:
                body = view[pos : pos + length]
                if reused:
                    body = body.tobytes()  # type: ignore[assignment]
                append(_make(Command, (cmd, flags, handle, offset, length, body)))
                pos += length
                continue
            error = None if valid else self._check(cmd, flags, handle, offset, length)
            if error is not None:
                skip = min(length, end - pos)
                pos += skip
                if skip < length:
                    self._drop, self._drop_event = length - skip, error
                    return events
                append(error)
                continue
            payload = self._buffer(length)
            have = end - pos
            payload[:have] = view[pos:end]
            self._payload, self._filled = payload, have
            self._header = (cmd, flags, handle, offset, length)
            return events
        if pos < end:
            self._tail = bytes(view[pos:end])
        return events

    def _continue_payload(self, view: memoryview, events: list[Event]) -> int:
        """Consume the rest of a split write payload; -1 if `view` was not enough."""
        if self._drop:
            take = min(self._drop, len(view))
            self._drop -= take
            if self._drop:
                return -1
            assert self._drop_event is not None
            events.append(self._drop_event)
            self._drop_event = None
            return take
        payload = self._payload
        assert payload is not None and self._header is not None
        take = min(len(payload) - self._filled, len(view))
        payload[self._filled : self._filled + take] = view[:take]
        self._filled += take
        if self._filled < len(payload):
            return -1
        cmd, flags, handle, offset, length = self._header
        events.append(Command(cmd, flags, handle, offset, length, payload))
        self._payload, self._header = None, None
        return take

    def _check(
        self, cmd: int, flags: int, handle: int, offset: int, length: int
    ) -> BadCommand | None:
        """The spec's error for an invalid request, or None."""
        if cmd in _WRITE_LIKE and self.readonly:
            return BadCommand(cmd, handle, Errno.EPERM, "the export is read-only")
        if cmd not in self._supported:
            if cmd == Cmd.BLOCK_STATUS and not self._block_status:
                return BadCommand(cmd, handle, Errno.EINVAL, "no metadata context was negotiated")
            return BadCommand(cmd, handle, Errno.EINVAL, f"command {cmd} is not supported")
        if flags & ~self._allowed[cmd]:
            return BadCommand(cmd, handle, Errno.EINVAL, f"flags {flags:#x} are not valid here")
        if cmd in _NEEDS_LENGTH:
            if length == 0:
                return BadCommand(cmd, handle, Errno.EINVAL, "zero-length request")
            if offset + length > self.size:
                err = Errno.ENOSPC if cmd in _ENOSPC_PAST_END else Errno.EINVAL
                return BadCommand(cmd, handle, err, "request goes past the end of the export")
            if (offset | length) & (self.min_block - 1):
                return BadCommand(
                    cmd, handle, Errno.EINVAL, "request is not aligned to the block size"
                )
            if length > self.max_payload and cmd in (Cmd.READ, Cmd.WRITE):
                return BadCommand(
                    cmd, handle, Errno.EINVAL, "request is larger than the block size limit"
                )
        return None


# Replies ------------------------------------------------------------------------------------


_SIMPLE_PACK = _SIMPLE.pack
_DATA_PACK = _DATA_CHUNK.pack
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_OFFSET_HOLE = int(ReplyType.OFFSET_HOLE)


def simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE_PACK(SIMPLE_REPLY_MAGIC, error, handle)


def data_chunk_header(handle: int, offset: int, length: int, *, done: bool = True) -> bytes:
    """OFFSET_DATA chunk header; `length` bytes of data follow it."""
    return _DATA_PACK(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        _OFFSET_DATA,
        handle,
        length + 8,
        offset,
    )


def hole_chunk(handle: int, offset: int, length: int, *, done: bool = True) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return _HOLE_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_HOLE, handle, 12, offset, length)


def none_chunk(handle: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, handle, 0)


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    raw = wire_string(message)
    return (
        _ERROR_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            ReplyType.ERROR,
            handle,
            6 + len(raw),
            error,
            len(raw),
        )
        + raw
    )


def block_status_chunk(handle: int, context_id: int, extents: Iterable[tuple[int, int]]) -> bytes:
    body = b"".join(_EXTENT.pack(length, flags) for length, flags in extents)
    return (
        _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, handle, 4 + len(body)
        )
        + context_id.to_bytes(4, "big")
        + body
    )
