"""The server side of NBD's fixed-newstyle handshake (option haggling), with no I/O.

Rules of this file: it owns every state transition of the handshake and knows nothing of
exports, sockets or policy. Bytes go in with `receive_data`, events come out of `next_event`,
and bytes to send are taken with `data_to_send`. What the protocol alone decides is answered
here (unknown options, malformed data, STRUCTURED_REPLY, meta-context query matching). What
needs the server's knowledge (which exports exist, TLS policy) becomes an event, and the
server answers it with one of the `reply_*` methods before the next option is parsed.

States, and what moves between them:

    CLIENT_FLAGS   --4 bytes, known flags-->            OPTION_HEADER
    CLIENT_FLAGS   --unknown client flags-->            CLOSED   (ProtocolError)
    OPTION_HEADER  --16 bytes, IHAVEOPT-->              OPTION_DATA
    OPTION_HEADER  --bad magic-->                       CLOSED   (ProtocolError)
    OPTION_HEADER  --length > MAX_OPTION_DATA-->        DRAIN    (then ERR_TOO_BIG)
    OPTION_DATA    --option answered here-->            OPTION_HEADER
    OPTION_DATA    --option needing the server-->       AWAIT_REPLY (event emitted)
    AWAIT_REPLY    --reply_error / reply_list / INFO--> OPTION_HEADER
    AWAIT_REPLY    --GO acked / EXPORT_NAME accepted--> TRANSMISSION
    AWAIT_REPLY    --reply_starttls (STARTTLS acked)--> TLS_HANDSHAKE
    TLS_HANDSHAKE  --tls_established()-->               OPTION_HEADER (over TLS now)
    any            --ABORT, close()-->                  CLOSED

Odd transitions: an EXPORT_NAME that cannot be honoured has no error reply in the protocol,
so `reply_error` on it closes the session; an oversized EXPORT_NAME closes it too.

TLS (the spec's FORCEDTLS and SELECTIVETLS modes): with `tls_required`, until TLS runs every
option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD here (oversized ones after they
are drained), EXPORT_NAME closes the session, and a client that did not set
NBD_FLAG_C_FIXED_NEWSTYLE (which STARTTLS needs) is closed at its flags. Once STARTTLS is acked,
everything negotiated before it is forgotten (structured replies, meta contexts), and bytes
received after it are dropped unread, now and until `tls_established()`: they were sent in
plaintext, and a man in the middle could have put them there. A second STARTTLS, or one with
data, gets NBD_REP_ERR_INVALID.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, auto

from nbdcrypt.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    wire_string,
)

_GREETING = struct.pack(
    ">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
)
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
_KNOWN_CLIENT_FLAGS = int(
    ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
)  # an int: ~ of a flag drops bits
BASE_ALLOCATION_ID = 1  # the meta-context ID this server gives base:allocation
_TLS_REQD = "TLS is required: send NBD_OPT_STARTTLS first"


class State(Enum):
    CLIENT_FLAGS = auto()
    OPTION_HEADER = auto()
    OPTION_DATA = auto()
    DRAIN = auto()
    AWAIT_REPLY = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acked: the server runs the TLS handshake
    TRANSMISSION = auto()
    CLOSED = auto()


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# Events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListExports:
    """NBD_OPT_LIST: answer with reply_list()."""


@dataclass(frozen=True, slots=True)
class ExportInfoRequest:
    """NBD_OPT_INFO (go=False) or NBD_OPT_GO: answer with reply_info() or reply_error()."""

    name: str
    requests: frozenset[int]
    go: bool


@dataclass(frozen=True, slots=True)
class ExportNameRequest:
    """NBD_OPT_EXPORT_NAME: answer with reply_export_name(), or reply_error() to close."""

    name: str


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """LIST/SET_META_CONTEXT for an export: answer with reply_meta_context() or reply_error()."""

    export: str
    contexts: tuple[str, ...]  # the contexts the queries matched
    select: bool  # SET (True) or LIST (False)


@dataclass(frozen=True, slots=True)
class StartTLSRequest:
    """NBD_OPT_STARTTLS before TLS runs: answer with reply_starttls(), or reply_error() if the
    server offers no TLS."""


@dataclass(frozen=True, slots=True)
class OptionAnswered:
    """An option this codec answered by itself (for logging)."""

    option: int
    reply: Rep


@dataclass(frozen=True, slots=True)
class Aborted:
    """NBD_OPT_ABORT: the ACK is queued; send it and close."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The client broke a rule that ends the session; close without a reply."""

    reason: str


@dataclass(frozen=True, slots=True)
class TransmissionStarted:
    """The handshake is over; what was negotiated, and any bytes already received after it."""

    negotiated: Negotiated
    trailing: bytes


@dataclass(frozen=True, slots=True)
class Negotiated:
    export_name: str  # the name as the client asked for it
    structured_replies: bool
    base_allocation: bool  # base:allocation was selected for this export
    no_zeroes: bool


Event = (
    ListExports
    | ExportInfoRequest
    | ExportNameRequest
    | MetaContextRequest
    | StartTLSRequest
    | OptionAnswered
    | Aborted
    | ProtocolError
    | TransmissionStarted
)


class _MalformedError(Exception):
    pass


class _Reader:
    """Parses an option's data, raising _MalformedError on anything short or long."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u32(self) -> int:
        return int(self._unpack(">I", 4))

    def u16(self) -> int:
        return int(self._unpack(">H", 2))

    def _unpack(self, fmt: str, size: int) -> int:
        if self.pos + size > len(self.data):
            raise _MalformedError("option data is truncated")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def string(self, length: int, what: str) -> str:
        if length > MAX_STRING:
            raise _MalformedError(f"{what} is longer than {MAX_STRING} bytes")
        if self.pos + length > len(self.data):
            raise _MalformedError(f"{what} runs past the end of the option data")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _MalformedError(f"{what} is not valid UTF-8") from None
        if "\0" in text:
            raise _MalformedError(f"{what} contains NUL")
        return text

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _MalformedError("option data has trailing bytes")


class ServerHandshake:
    """One client's handshake, from the greeting to the transmission phase."""

    def __init__(self, *, tls_required: bool = False) -> None:
        self.state = State.CLIENT_FLAGS
        self.tls_required = tls_required  # FORCEDTLS: no option but STARTTLS/ABORT before TLS
        self.tls_active = False  # STARTTLS was acked and the server established TLS
        self.discarded = 0  # plaintext bytes received after the STARTTLS ACK, dropped unread
        self._in = bytearray()
        self._out = bytearray(_GREETING)
        self._client_flags = ClientFlag(0)
        self._option = 0
        self._option_len = 0
        self._pending: Event | None = None
        self._structured = False
        self._meta_export: str | None = None  # export of the last successful SET_META_CONTEXT
        self._meta_selected = False
        self._trailing = b""

    # Input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is State.TLS_HANDSHAKE:
            self.discarded += len(data)
        elif self.state not in (State.CLOSED, State.TRANSMISSION):
            self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def structured_replies(self) -> bool:
        return self._structured

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA until more bytes (or the reply to an event) arrive."""
        while True:
            state = self.state
            if state is State.CLIENT_FLAGS:
                if len(self._in) < 4:
                    return NEED_DATA
                flags = int.from_bytes(self._in[:4], "big")
                del self._in[:4]
                if flags & ~_KNOWN_CLIENT_FLAGS:
                    return self._fail(f"unknown client flags {flags:#x}")
                self._client_flags = ClientFlag(flags)
                if self.tls_required and not self._fixed_newstyle:
                    return self._fail("TLS is required, and STARTTLS needs fixed newstyle")
                self.state = State.OPTION_HEADER
            elif state is State.OPTION_HEADER:
                if len(self._in) < 16:
                    return NEED_DATA
                magic, option, length = _OPTION_HEADER.unpack_from(self._in)
                del self._in[:16]
                if magic != IHAVEOPT:
                    return self._fail(f"bad option magic {magic:#x}")
                self._option, self._option_len = option, length
                if length > MAX_OPTION_DATA:
                    if option == Opt.EXPORT_NAME:
                        return self._fail("EXPORT_NAME data is too large")
                    self.state = State.DRAIN
                else:
                    self.state = State.OPTION_DATA
            elif state is State.DRAIN:
                take = min(self._option_len, len(self._in))
                del self._in[:take]
                self._option_len -= take
                if self._option_len:
                    return NEED_DATA
                self.state = State.OPTION_HEADER
                if self._tls_gate(self._option):
                    return self._answer(Rep.ERR_TLS_REQD, _TLS_REQD)
                return self._answer(Rep.ERR_TOO_BIG, "option data is too large")
            elif state is State.OPTION_DATA:
                if len(self._in) < self._option_len:
                    return NEED_DATA
                data = bytes(self._in[: self._option_len])
                del self._in[: self._option_len]
                self.state = State.OPTION_HEADER
                event = self._dispatch(self._option, data)
                if event is not None:
                    return event
            elif state is State.TRANSMISSION:
                return NEED_DATA
            else:  # AWAIT_REPLY, CLOSED
                return NEED_DATA

    # Option dispatch ------------------------------------------------------------------------

    @property
    def _fixed_newstyle(self) -> bool:
        return bool(self._client_flags & ClientFlag.C_FIXED_NEWSTYLE)

    def _tls_gate(self, option: int) -> bool:
        """True if `option` must be refused because TLS is required and not running yet."""
        return self.tls_required and not self.tls_active and option not in (Opt.STARTTLS, Opt.ABORT)

    def _dispatch(self, option: int, data: bytes) -> Event | None:
        if self._tls_gate(option):
            if option == Opt.EXPORT_NAME:  # it has no error reply: the session ends
                return self._fail("EXPORT_NAME before STARTTLS, and TLS is required")
            return self._answer(Rep.ERR_TLS_REQD, _TLS_REQD)
        try:
            if option == Opt.EXPORT_NAME:
                return self._await(ExportNameRequest(_Reader(data).string(len(data), "name")))
            if option == Opt.ABORT:
                self._reply(option, Rep.ACK)
                self.state = State.CLOSED
                return Aborted()
            if option == Opt.LIST:
                self._no_data(data)
                return self._await(ListExports())
            if option == Opt.STARTTLS:
                self._no_data(data)
                if self.tls_active:
                    return self._answer(Rep.ERR_INVALID, "TLS is already running")
                if not self._fixed_newstyle:
                    return self._answer(Rep.ERR_POLICY, "STARTTLS needs fixed newstyle")
                return self._await(StartTLSRequest())
            if option in (Opt.INFO, Opt.GO):
                return self._await(self._parse_info(data, go=option == Opt.GO))
            if option == Opt.STRUCTURED_REPLY:
                self._no_data(data)
                self._structured = True
                return self._answer(Rep.ACK)
            if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                select = option == Opt.SET_META_CONTEXT
                if select:  # a SET replaces the selection even when it fails
                    self._meta_export, self._meta_selected = None, False
                if not self._structured:
                    return self._answer(Rep.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
                return self._await(self._parse_meta(data, select))
        except _MalformedError as exc:
            if option == Opt.EXPORT_NAME:
                return self._fail(f"EXPORT_NAME: {exc}")
            return self._answer(Rep.ERR_INVALID, str(exc))
        return self._answer(Rep.ERR_UNSUP, f"option {option} is not supported")

    @staticmethod
    def _no_data(data: bytes) -> None:
        if data:
            raise _MalformedError("this option takes no data")

    def _parse_info(self, data: bytes, *, go: bool) -> ExportInfoRequest:
        r = _Reader(data)
        name = r.string(r.u32(), "export name")
        count = r.u16()
        requests = frozenset(r.u16() for _ in range(count))
        r.end()
        return ExportInfoRequest(name, requests, go)

    def _parse_meta(self, data: bytes, select: bool) -> MetaContextRequest:
        r = _Reader(data)
        export = r.string(r.u32(), "export name")
        queries = [r.string(r.u32(), "query") for _ in range(r.u32())]
        r.end()
        for query in queries:
            if ":" not in query:
                raise _MalformedError(f"query {query!r} has no namespace")
        if select:
            matched = BASE_ALLOCATION in queries
        else:
            matched = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        return MetaContextRequest(export, (BASE_ALLOCATION,) if matched else (), select)

    # Replies from the server ----------------------------------------------------------------

    def reply_error(self, rep: Rep, message: str) -> None:
        """Fail the pending option (EXPORT_NAME cannot fail: the session closes instead)."""
        pending = self._take_pending()
        if isinstance(pending, ExportNameRequest):
            self.state = State.CLOSED
            return
        self._reply(self._option, rep, wire_string(message))
        self.state = State.OPTION_HEADER

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> None:
        """Answer NBD_OPT_LIST with (name, description) pairs."""
        self._take_pending(ListExports)
        for name, description in exports:
            raw = name.encode()
            self._reply(
                Opt.LIST, Rep.SERVER, struct.pack(">I", len(raw)) + raw + description.encode()
            )
        self._reply(Opt.LIST, Rep.ACK)
        self.state = State.OPTION_HEADER

    def reply_info(
        self,
        *,
        name: str,
        size: int,
        flags: int,
        description: str,
        block_sizes: tuple[int, int, int],
    ) -> TransmissionStarted | None:
        """Answer INFO/GO for an export that exists; GO ends the handshake."""
        pending = self._take_pending(ExportInfoRequest)
        assert isinstance(pending, ExportInfoRequest)
        opt = Opt.GO if pending.go else Opt.INFO
        self._reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))
        if Info.NAME in pending.requests:
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.NAME) + name.encode())
        if Info.DESCRIPTION in pending.requests and description:
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + description.encode())
        self._reply(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, *block_sizes))
        self._reply(opt, Rep.ACK)
        if not pending.go:
            self.state = State.OPTION_HEADER
            return None
        return self._start_transmission(pending.name)

    def reply_export_name(self, *, size: int, flags: int) -> TransmissionStarted:
        """Accept EXPORT_NAME: send size and flags and end the handshake."""
        pending = self._take_pending(ExportNameRequest)
        assert isinstance(pending, ExportNameRequest)
        self._out += struct.pack(">QH", size, flags)
        if not self._client_flags & ClientFlag.C_NO_ZEROES:
            self._out += bytes(124)
        return self._start_transmission(pending.name)

    def reply_meta_context(self) -> None:
        """Answer LIST/SET_META_CONTEXT for an export that exists."""
        pending = self._take_pending(MetaContextRequest)
        assert isinstance(pending, MetaContextRequest)
        opt = Opt.SET_META_CONTEXT if pending.select else Opt.LIST_META_CONTEXT
        for context in pending.contexts:
            ctx_id = BASE_ALLOCATION_ID if pending.select else 0
            self._reply(opt, Rep.META_CONTEXT, struct.pack(">I", ctx_id) + context.encode())
        if pending.select:
            self._meta_export = pending.export
            self._meta_selected = bool(pending.contexts)
        self._reply(opt, Rep.ACK)
        self.state = State.OPTION_HEADER

    def reply_starttls(self) -> None:
        """Accept NBD_OPT_STARTTLS: queue the ACK (the last plaintext byte to send), forget what
        was negotiated and drop unread input. The server then runs the TLS handshake over the
        same stream and calls tls_established()."""
        self._take_pending(StartTLSRequest)
        self._reply(Opt.STARTTLS, Rep.ACK)
        self.discarded += len(self._in)
        self._in.clear()
        self._structured = False
        self._meta_export, self._meta_selected = None, False
        self.state = State.TLS_HANDSHAKE

    def tls_established(self) -> None:
        """The TLS handshake succeeded: option haggling goes on over TLS."""
        if self.state is not State.TLS_HANDSHAKE:
            raise RuntimeError("no STARTTLS was acked")
        self.tls_active = True
        self.state = State.OPTION_HEADER

    def close(self) -> None:
        self.state = State.CLOSED

    # Internals ------------------------------------------------------------------------------

    def _await(self, event: Event) -> Event:
        self._pending = event
        self.state = State.AWAIT_REPLY
        return event

    def _take_pending(self, kind: type | None = None) -> Event:
        pending = self._pending
        if self.state is not State.AWAIT_REPLY or pending is None:
            raise RuntimeError("no option is waiting for a reply")
        if kind is not None and not isinstance(pending, kind):
            raise RuntimeError(f"the pending option is {type(pending).__name__}")
        self._pending = None
        return pending

    def _answer(self, rep: Rep, message: str = "") -> OptionAnswered:
        self._reply(self._option, rep, wire_string(message))
        return OptionAnswered(self._option, rep)

    def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += _REPLY_HEADER.pack(REPLY_MAGIC, option, rep, len(data))
        self._out += data

    def _fail(self, reason: str) -> ProtocolError:
        self.state = State.CLOSED
        return ProtocolError(reason)

    def _start_transmission(self, export_name: str) -> TransmissionStarted:
        self.state = State.TRANSMISSION
        negotiated = Negotiated(
            export_name=export_name,
            structured_replies=self._structured,
            base_allocation=self._meta_selected and self._meta_export == export_name,
            no_zeroes=bool(self._client_flags & ClientFlag.C_NO_ZEROES),
        )
        trailing = bytes(self._in)
        self._in.clear()
        return TransmissionStarted(negotiated, trailing)
