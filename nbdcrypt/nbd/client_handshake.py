"""The client side of NBD's fixed-newstyle handshake, with no I/O.

The mirror of handshake.py, for nbdcrypt's own clients (the stress tool): bytes from the server
go in with `receive_data`, events come out of `next_event`, and bytes to send are taken with
`data_to_send`. The codec asks for what a modern client wants and nothing else: NO_ZEROES when
the server offers it, NBD_OPT_STRUCTURED_REPLY (unless told not to), then NBD_OPT_GO with an
NBD_INFO_BLOCK_SIZE request. A server without NBD_OPT_GO (ERR_UNSUP) gets NBD_OPT_EXPORT_NAME,
and so does one that did not offer fixed newstyle (which knows no other option).

States, and what moves between them:

    GREETING        --18 bytes, fixed newstyle-->       STRUCTURED (or GO without structured)
    GREETING        --newstyle, not fixed-->            EXPORT_NAME (sent at once)
    GREETING        --bad magic, oldstyle-->            CLOSED   (ProtocolError)
    STRUCTURED      --ACK or an error reply-->          GO
    GO              --INFO replies, then ACK-->         DONE     (HandshakeDone)
    GO              --ERR_UNSUP-->                      EXPORT_NAME
    GO              --another error reply-->            CLOSED   (Refused; NBD_OPT_ABORT queued)
    EXPORT_NAME     --size, flags (and zeroes)-->       DONE     (HandshakeDone)
    any             --a broken reply-->                 CLOSED   (ProtocolError)
    any but DONE    --connection_lost()-->              CLOSED   (ProtocolError or Refused)

The server breaks the protocol (ProtocolError) with a wrong magic, a reply to another option
than the one sent, an option reply of an unknown or unexpected type, an NBD_INFO of the wrong
size, block sizes the spec forbids, or transmission flags without NBD_FLAG_HAS_FLAGS.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, auto

from nbdcrypt.nbd.constants import (
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdcrypt.nbd.handshake import (
    NEED_DATA,  # one sentinel for every codec
    _NeedData,
)

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_ERR = 1 << 31
MAX_REPLY_DATA = 1024 * 1024  # a longer option reply is taken as a broken server
DEFAULT_BLOCK_SIZES = (1, 4096, MAX_PAYLOAD)  # the spec's defaults; 32 MiB for interoperability


class ClientState(Enum):
    GREETING = auto()
    STRUCTURED = auto()
    GO = auto()
    EXPORT_NAME = auto()
    DONE = auto()
    CLOSED = auto()


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake learnt about the export."""

    name: str
    size: int
    flags: int  # transmission flags
    block_sizes: tuple[int, int, int]  # minimum, preferred, maximum payload
    block_sizes_advertised: bool  # False: the spec's defaults (no NBD_INFO_BLOCK_SIZE)
    structured_replies: bool
    description: str = ""

    @property
    def min_block(self) -> int:
        return self.block_sizes[0]

    @property
    def max_payload(self) -> int:
        return self.block_sizes[2]

    def can(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """Transmission may start; `trailing` is what the server sent after the handshake."""

    info: ExportInfo
    trailing: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """The server turned the export down (an error reply to NBD_OPT_GO, or it closed the
    connection after NBD_OPT_EXPORT_NAME). `rep` is the error reply type, if there was one."""

    rep: int | None
    message: str

    def __str__(self) -> str:
        if self.rep is None:
            return self.message
        name = Rep(self.rep).name if self.rep in Rep._value2member_map_ else f"{self.rep:#x}"
        return f"{name}: {self.message}" if self.message else name


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The server broke the handshake protocol; close the connection."""

    reason: str


Event = HandshakeDone | Refused | ProtocolError


def option_bytes(option: int, data: bytes = b"") -> bytes:
    """An option request: IHAVEOPT, option, length, data."""
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def go_data(name: bytes, requests: tuple[int, ...]) -> bytes:
    """NBD_OPT_GO's data: name length, name, count of information requests, requests."""
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(f">H{len(requests)}H", len(requests), *requests)
    )


class ClientHandshake:
    """One connection's handshake, from the greeting to transmission, as a client."""

    def __init__(self, export_name: str, *, structured_replies: bool = True) -> None:
        try:
            raw = export_name.encode()
        except UnicodeEncodeError:
            raise ValueError("the export name is not valid Unicode text (a surrogate)") from None
        if len(raw) > MAX_STRING:
            raise ValueError(f"the export name is longer than {MAX_STRING} bytes")
        if "\0" in export_name:
            raise ValueError("the export name contains NUL")
        self.export_name = export_name
        self._name = raw
        self.want_structured = structured_replies
        self.state = ClientState.GREETING
        self._in = bytearray()
        self._out = bytearray()
        self._no_zeroes = False
        self._structured = False
        self._size: int | None = None
        self._flags = 0
        self._block_sizes: tuple[int, int, int] | None = None
        self._description = ""

    def receive_data(self, data: bytes) -> None:
        if self.state not in (ClientState.DONE, ClientState.CLOSED):
            self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def connection_lost(self) -> Event:
        """The server closed the connection before transmission began."""
        state, self.state = self.state, ClientState.CLOSED
        if state is ClientState.EXPORT_NAME:  # the only way to refuse EXPORT_NAME
            name = self.export_name
            return Refused(None, f"the server closed the connection: no export {name!r}?")
        return ProtocolError("the server closed the connection during the handshake")

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA until more bytes arrive."""
        while True:
            state = self.state
            if state is ClientState.GREETING:
                if len(self._in) < _GREETING.size:
                    return NEED_DATA
                result = self._greeting()
            elif state in (ClientState.STRUCTURED, ClientState.GO):
                reply = self._take_reply()
                if reply is None:
                    return NEED_DATA
                if isinstance(reply, ProtocolError):
                    return self._fail(reply.reason)
                result = self._on_reply(*reply)
            elif state is ClientState.EXPORT_NAME:
                result = self._export_name_reply()
                if result is None:
                    return NEED_DATA
            else:  # DONE, CLOSED
                return NEED_DATA
            if result is not None:
                return result

    # Phases ---------------------------------------------------------------------------------

    def _greeting(self) -> Event | None:
        magic, second, flags = _GREETING.unpack_from(self._in)
        del self._in[: _GREETING.size]
        if magic != NBDMAGIC:
            return self._fail(f"not an NBD server (greeting magic {magic:#x})")
        if second != IHAVEOPT:
            return self._fail("the server speaks oldstyle negotiation, which is not supported")
        fixed = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        client = ClientFlag.C_FIXED_NEWSTYLE if fixed else ClientFlag(0)
        if self._no_zeroes:
            client |= ClientFlag.C_NO_ZEROES
        self._out += struct.pack(">I", client)
        if not fixed:  # plain newstyle: an unknown option would end the session
            self._send_export_name()
        elif self.want_structured:
            self._out += option_bytes(Opt.STRUCTURED_REPLY)
            self.state = ClientState.STRUCTURED
        else:
            self._send_go()
        return None

    def _send_go(self) -> None:
        self._out += option_bytes(Opt.GO, go_data(self._name, (Info.BLOCK_SIZE,)))
        self.state = ClientState.GO

    def _send_export_name(self) -> None:
        self._out += option_bytes(Opt.EXPORT_NAME, self._name)
        self.state = ClientState.EXPORT_NAME

    def _take_reply(self) -> tuple[int, bytes] | ProtocolError | None:
        """(reply type, data) of the next option reply to the option in flight."""
        if len(self._in) < _REPLY.size:
            return None
        magic, option, rep, length = _REPLY.unpack_from(self._in)
        if magic != REPLY_MAGIC:
            return ProtocolError(f"bad option reply magic {magic:#x}")
        sent = Opt.STRUCTURED_REPLY if self.state is ClientState.STRUCTURED else Opt.GO
        if option != sent:
            return ProtocolError(f"a reply to option {option} while waiting for {sent.name}")
        if length > MAX_REPLY_DATA:
            return ProtocolError(f"an option reply of {length} bytes")
        end = _REPLY.size + length
        if len(self._in) < end:
            return None
        data = bytes(self._in[_REPLY.size : end])
        del self._in[:end]
        return rep, data

    def _on_reply(self, rep: int, data: bytes) -> Event | None:
        if self.state is ClientState.STRUCTURED:
            if rep == Rep.ACK:
                self._structured = True
            elif not rep & _ERR:  # an error just means no structured replies
                return self._fail(f"reply type {rep:#x} to NBD_OPT_STRUCTURED_REPLY")
            self._send_go()
            return None
        if rep == Rep.INFO:
            return self._info(data)
        if rep == Rep.ACK:
            if self._size is None:
                return self._fail("NBD_OPT_GO was acknowledged without NBD_INFO_EXPORT")
            return self._done(self._block_sizes)
        if rep == Rep.ERR_UNSUP:  # an old server: fall back, as the spec asks clients to
            self._send_export_name()
            return None
        if rep & _ERR:
            self._out += option_bytes(Opt.ABORT)
            self.state = ClientState.CLOSED
            return Refused(rep, data.decode("utf-8", "replace"))
        return self._fail(f"reply type {rep:#x} to NBD_OPT_GO")

    def _info(self, data: bytes) -> Event | None:
        if len(data) < 2:
            return self._fail("an NBD_REP_INFO shorter than its type")
        (kind,) = struct.unpack_from(">H", data)
        if kind == Info.EXPORT:
            if len(data) != 12:
                return self._fail(f"NBD_INFO_EXPORT of {len(data)} bytes (expected 12)")
            _, self._size, self._flags = struct.unpack(">HQH", data)
        elif kind == Info.BLOCK_SIZE:
            if len(data) != 14:
                return self._fail(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes (expected 14)")
            sizes = struct.unpack_from(">III", data, 2)
            problem = _block_size_problem(sizes)
            if problem:
                return self._fail(f"NBD_INFO_BLOCK_SIZE {sizes}: {problem}")
            self._block_sizes = sizes
        elif kind == Info.DESCRIPTION:
            self._description = data[2:].decode("utf-8", "replace")
        return None  # NBD_INFO_NAME and unknown information are ignored, as the spec says

    def _export_name_reply(self) -> Event | None:
        need = _EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
        if len(self._in) < need:
            return None
        self._size, self._flags = _EXPORT_NAME_REPLY.unpack_from(self._in)
        del self._in[:need]
        return self._done(None)

    def _done(self, block_sizes: tuple[int, int, int] | None) -> Event:
        if not self._flags & TransmissionFlag.HAS_FLAGS:
            return self._fail(f"transmission flags {self._flags:#x} lack NBD_FLAG_HAS_FLAGS")
        assert self._size is not None
        self.state = ClientState.DONE
        info = ExportInfo(
            name=self.export_name,
            size=self._size,
            flags=self._flags,
            block_sizes=block_sizes or DEFAULT_BLOCK_SIZES,
            block_sizes_advertised=block_sizes is not None,
            structured_replies=self._structured,
            description=self._description,
        )
        trailing = bytes(self._in)
        self._in.clear()
        return HandshakeDone(info, trailing)

    def _fail(self, reason: str) -> ProtocolError:
        self.state = ClientState.CLOSED
        return ProtocolError(reason)


def _block_size_problem(sizes: tuple[int, ...]) -> str:
    """What is wrong with advertised block sizes, by the spec's rules, or ''."""
    minimum, preferred, maximum = sizes
    if minimum == 0 or minimum & (minimum - 1) or minimum > 64 * 1024:
        return "the minimum must be a power of 2 up to 64 KiB"
    if preferred & (preferred - 1) or preferred < max(minimum, 512):
        return "the preferred size must be a power of 2, at least 512 and the minimum"
    if maximum < minimum or (maximum != 0xFFFFFFFF and maximum % minimum):
        return "the maximum must be a multiple of the minimum"
    return ""
