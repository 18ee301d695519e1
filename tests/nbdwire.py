"""The client's side of the NBD wire, written from the spec for the codec's unit tests.

Every number and layout here comes from NetworkBlockDevice/nbd doc/proto.md, not from
nbdcrypt.nbd, so that a wrong constant or struct in the codec cannot hide in both places.
Only builders and parsers of bytes live here: no sockets, no nbdcrypt imports.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

# Magic numbers ------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server, 16 bits) and client flags (32 bits)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
C_FIXED_NEWSTYLE = 1 << 0
C_NO_ZEROES = 1 << 1

# Transmission flags
HAS_FLAGS = 1 << 0
READ_ONLY = 1 << 1
SEND_FLUSH = 1 << 2
SEND_FUA = 1 << 3
ROTATIONAL = 1 << 4
SEND_TRIM = 1 << 5
SEND_WRITE_ZEROES = 1 << 6
SEND_DF = 1 << 7
CAN_MULTI_CONN = 1 << 8
SEND_CACHE = 1 << 10
SEND_FAST_ZERO = 1 << 11

# Options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9

# NBD_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured replies
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# Errors
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

MAX_STRING = 4096  # "MUST be no longer than 4096 bytes"

# Server -> client: the greeting -----------------------------------------------------------------

GREETING_LEN = 8 + 8 + 2


def greeting(handshake_flags: int) -> bytes:
    """S: NBDMAGIC, IHAVEOPT, 16 bits of handshake flags."""
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, handshake_flags)


# Client -> server: handshake ------------------------------------------------------------------


def client_flags(flags: int) -> bytes:
    """C: 32 bits of client flags."""
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    """C: IHAVEOPT, 32-bit option, 32-bit data length, data (length may lie on purpose)."""
    n = len(data) if length is None else length
    return struct.pack(">QII", IHAVEOPT, opt, n) + data


def info_data(name: bytes, requests: Iterable[int] = ()) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data: 32-bit name length, name, 16-bit count, 16-bit items."""
    reqs = list(requests)
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(reqs))
        + b"".join(struct.pack(">H", r) for r in reqs)
    )


def meta_data(export: bytes, queries: Iterable[bytes] = ()) -> bytes:
    """LIST/SET_META_CONTEXT data: export name, 32-bit query count, length-prefixed queries."""
    qs = list(queries)
    return (
        struct.pack(">I", len(export))
        + export
        + struct.pack(">I", len(qs))
        + b"".join(struct.pack(">I", len(q)) + q for q in qs)
    )


# Server -> client: option replies ---------------------------------------------------------------


@dataclass(frozen=True)
class OptReply:
    option: int
    rep: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.rep & REP_ERR)

    @property
    def is_final(self) -> bool:
        return self.rep == REP_ACK or self.is_error


def opt_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    """S: reply magic, 32-bit option, 32-bit reply type, 32-bit length, data."""
    return struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rep, len(data)) + data


def parse_opt_replies(data: bytes) -> list[OptReply]:
    """Split bytes into option replies; anything that is not exactly that fails the test."""
    out: list[OptReply] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 20, f"truncated reply header at {pos}: {data[pos:]!r}"
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPT_REPLY_MAGIC, f"bad reply magic {magic:#x} at {pos}"
        pos += 20
        assert len(data) - pos >= length, f"reply at {pos - 20} is truncated"
        out.append(OptReply(opt, rep, data[pos : pos + length]))
        pos += length
    return out


def info_export(size: int, flags: int) -> bytes:
    """NBD_REP_INFO payload of NBD_INFO_EXPORT (length 12)."""
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_REP_INFO payload of NBD_INFO_BLOCK_SIZE (length 14)."""
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_string(info: int, text: bytes) -> bytes:
    """NBD_REP_INFO payload of NBD_INFO_NAME / NBD_INFO_DESCRIPTION."""
    return struct.pack(">H", info) + text


def rep_server(name: bytes, description: bytes = b"") -> bytes:
    """NBD_REP_SERVER payload: 32-bit name length, name, then free-form details."""
    return struct.pack(">I", len(name)) + name + description


def rep_meta_context(context_id: int, name: bytes) -> bytes:
    """NBD_REP_META_CONTEXT payload: 32-bit context ID, context name."""
    return struct.pack(">I", context_id) + name


def export_name_reply(size: int, flags: int, *, zeroes: bool) -> bytes:
    """S: the answer to NBD_OPT_EXPORT_NAME: 64-bit size, 16-bit flags, maybe 124 zeroes."""
    return struct.pack(">QH", size, flags) + (bytes(124) if zeroes else b"")


# Transmission ---------------------------------------------------------------------------------

REQUEST_LEN = 28


def request(
    cmd: int,
    *,
    flags: int = 0,
    handle: int = 0,
    offset: int = 0,
    length: int = 0,
    payload: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    """C: magic, 16-bit flags, 16-bit type, 64-bit handle, 64-bit offset, 32-bit length, data."""
    return struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + payload


def simple_reply(handle: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle)


def chunk(flags: int, rtype: int, handle: int, payload: bytes) -> bytes:
    """S: a structured reply chunk: magic, 16-bit flags, 16-bit type, handle, length, payload."""
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, rtype, handle, len(payload)) + (
        payload
    )


def chunks_of(
    data: bytes | bytearray | memoryview,
) -> list[tuple[int, int, int, bytes]]:
    """Split bytes into (flags, type, handle, payload) structured chunks, exactly."""
    raw = bytes(data)
    out: list[tuple[int, int, int, bytes]] = []
    pos = 0
    while pos < len(raw):
        assert len(raw) - pos >= 20, "truncated chunk header"
        magic, flags, rtype, handle, length = struct.unpack_from(">IHHQI", raw, pos)
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x}"
        pos += 20
        assert len(raw) - pos >= length, "truncated chunk payload"
        out.append((flags, rtype, handle, raw[pos : pos + length]))
        pos += length
    return out
