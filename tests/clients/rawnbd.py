"""A tiny blocking NBD client over a raw socket, for the protocol corners no real client reaches.

It knows the wire format from the spec (NetworkBlockDevice/nbd doc/proto.md) and nothing of
nbdcrypt: its constants come from tests/nbdwire.py, typed in from the spec, so that a wrong
number in the server's own constants cannot hide in both places. Every socket operation has a
timeout.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

# The protocol's numbers, typed in from the spec once for all test clients (tests/nbdwire.py),
# re-exported for the tests that use this client.
from nbdwire import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    CAN_MULTI_CONN,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    EIO,
    ENOSPC,
    ENOTSUP,
    EOVERFLOW,
    EPERM,
    ESHUTDOWN,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    HAS_FLAGS,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    READ_ONLY,
    REP_ACK,
    REP_ERR,
    REP_ERR_INVALID,
    REP_ERR_PLATFORM,
    REP_ERR_POLICY,
    REP_ERR_SHUTDOWN,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST_MAGIC,
    SEND_CACHE,
    SEND_DF,
    SEND_FAST_ZERO,
    SEND_FLUSH,
    SEND_FUA,
    SEND_TRIM,
    SEND_WRITE_ZEROES,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)


class ClosedError(Exception):
    """The server closed the connection (EOF or reset) while we waited for bytes."""


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & REP_ERR)


class OptError(Exception):
    def __init__(self, reply: OptReply) -> None:
        super().__init__(f"option {reply.option} failed: type {reply.type:#x} {reply.data!r}")
        self.reply = reply


@dataclass
class ExportInfo:
    size: int = 0
    flags: int = 0
    name: str | None = None
    description: str | None = None
    block_size: tuple[int, int, int] | None = None
    infos: list[int] = field(default_factory=list)


@dataclass
class Chunk:
    flags: int
    type: int
    payload: bytes


@dataclass
class Reply:
    handle: int
    error: int = 0
    data: bytes = b""  # a simple read reply's payload
    chunks: list[Chunk] = field(default_factory=list)  # structured replies

    @property
    def structured(self) -> bool:
        return bool(self.chunks)

    def chunk_errors(self) -> list[tuple[int, str]]:
        """(error, message) of every error chunk."""
        out = []
        for c in self.chunks:
            if c.type & (1 << 15):
                err, mlen = struct.unpack_from(">IH", c.payload)
                out.append((err, c.payload[6 : 6 + mlen].decode(errors="replace")))
        return out

    @property
    def errno(self) -> int:
        """The reply's error, simple or structured (0 when it succeeded)."""
        if self.error:
            return self.error
        errs = self.chunk_errors()
        return errs[0][0] if errs else 0


class RawNBD:
    """One connection. Methods raise ClosedError when the server hangs up."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.handshake_flags = 0
        self.client_flags = 0
        self.structured = False
        self._handle = 0
        self._pending_reads: dict[int, int] = {}  # handle -> length, for simple read replies

    @classmethod
    def unix(cls, path: Path | str, timeout: float = 10.0) -> RawNBD:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(path))
        return cls(s, timeout)

    @classmethod
    def tcp(cls, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawNBD:
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(s, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNBD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- bytes
    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ClosedError(str(e)) from e

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                part = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError as e:
                raise ClosedError(f"reset after {len(buf)}/{n} bytes") from e
            if not part:
                raise ClosedError(f"EOF after {len(buf)}/{n} bytes")
            buf += part
        return bytes(buf)

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until EOF (or reset) within timeout; returns whatever arrived first.

        Raises TimeoutError (socket.timeout) if the server keeps the connection open.
        """
        self.sock.settimeout(timeout)
        got = bytearray()
        while True:
            try:
                part = self.sock.recv(65536)
            except ConnectionResetError:
                return bytes(got)
            if not part:
                return bytes(got)
            got += part
            if len(got) > 1 << 20:
                raise AssertionError("server keeps sending data instead of closing")

    # ---- handshake
    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        flags = int(flags)
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        self.handshake_flags = flags
        return flags

    def send_client_flags(self, flags: int) -> None:
        self.client_flags = flags
        self.send(struct.pack(">I", flags))

    def start(self, client_flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> int:
        """Greeting and client flags; returns the server's handshake flags."""
        flags = self.greeting()
        self.send_client_flags(client_flags)
        return flags

    def send_option(self, option: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        self.send(struct.pack(">QII", magic, option, len(data)) + data)

    def recv_option_reply(self) -> OptReply:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        assert length <= 1 << 20, f"option reply length {length}"
        return OptReply(option, rtype, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptReply]:
        """Send an option and collect replies up to the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        for _ in range(10_000):
            r = self.recv_option_reply()
            assert r.option == option, f"reply for option {r.option}, sent {option}"
            replies.append(r)
            if r.type == REP_ACK or r.is_error:
                return replies
        raise AssertionError("no final option reply")

    @staticmethod
    def info_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
        n = name.encode()
        return (
            struct.pack(">I", len(n))
            + n
            + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests)
        )

    def opt_info(
        self, name: str, requests: tuple[int, ...] = (INFO_BLOCK_SIZE,), *, go: bool = False
    ) -> ExportInfo:
        """NBD_OPT_INFO (or GO); raises OptError with the final error reply."""
        opt = OPT_GO if go else OPT_INFO
        replies = self.option(opt, self.info_data(name, requests))
        final = replies[-1]
        if final.is_error:
            raise OptError(final)
        info = ExportInfo()
        for r in replies[:-1]:
            assert r.type == REP_INFO, f"unexpected reply {r.type:#x} before ACK"
            (itype,) = struct.unpack_from(">H", r.data)
            info.infos.append(itype)
            if itype == INFO_EXPORT:
                assert len(r.data) == 12, f"INFO_EXPORT length {len(r.data)}"
                info.size, info.flags = struct.unpack_from(">QH", r.data, 2)
            elif itype == INFO_NAME:
                info.name = r.data[2:].decode()
            elif itype == INFO_DESCRIPTION:
                info.description = r.data[2:].decode()
            elif itype == INFO_BLOCK_SIZE:
                assert len(r.data) == 14, f"INFO_BLOCK_SIZE length {len(r.data)}"
                info.block_size = struct.unpack_from(">III", r.data, 2)
        assert INFO_EXPORT in info.infos, "ACK without NBD_INFO_EXPORT"
        return info

    def opt_go(self, name: str, requests: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> ExportInfo:
        return self.opt_info(name, requests, go=True)

    def opt_structured_reply(self) -> None:
        r = self.option(OPT_STRUCTURED_REPLY)
        if r[-1].type != REP_ACK:
            raise OptError(r[-1])
        self.structured = True

    @staticmethod
    def meta_data(name: str, queries: tuple[str, ...]) -> bytes:
        n = name.encode()
        out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            qb = q.encode()
            out += struct.pack(">I", len(qb)) + qb
        return out

    def meta_context(
        self, name: str, queries: tuple[str, ...], *, list_only: bool = False
    ) -> dict[str, int]:
        """SET (or LIST) META_CONTEXT; returns {context name: id}."""
        opt = OPT_LIST_META_CONTEXT if list_only else OPT_SET_META_CONTEXT
        replies = self.option(opt, self.meta_data(name, queries))
        if replies[-1].is_error:
            raise OptError(replies[-1])
        out = {}
        for r in replies[:-1]:
            assert r.type == REP_META_CONTEXT, f"unexpected reply {r.type:#x}"
            (cid,) = struct.unpack_from(">I", r.data)
            out[r.data[4:].decode()] = cid
        return out

    def opt_list(self) -> list[tuple[str, str]]:
        replies = self.option(OPT_LIST)
        if replies[-1].is_error:
            raise OptError(replies[-1])
        out = []
        for r in replies[:-1]:
            assert r.type == REP_SERVER, f"unexpected reply {r.type:#x}"
            (nlen,) = struct.unpack_from(">I", r.data)
            out.append((r.data[4 : 4 + nlen].decode(), r.data[4 + nlen :].decode()))
        return out

    def export_name(self, name: str) -> tuple[int, int]:
        """NBD_OPT_EXPORT_NAME: (size, transmission flags); checks the zero padding if due."""
        self.send_option(OPT_EXPORT_NAME, name.encode())
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        if not (self.client_flags & C_NO_ZEROES):
            pad = self.recv_exact(124)
            assert pad == bytes(124), "NBD_OPT_EXPORT_NAME padding is not zeroes"
        return size, flags

    # ---- transmission
    def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> int:
        """Send one request; returns its handle."""
        self._handle += 1
        handle = self._handle
        if cmd == CMD_READ and not self.structured:
            self._pending_reads[handle] = length
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)
        return handle

    def recv_reply(self) -> Reply:
        """The next reply (all chunks of a structured one, which must not interleave here)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            simple = Reply(handle, error)
            length = self._pending_reads.pop(handle, 0)
            if length and not error:
                simple.data = self.recv_exact(length)
            return simple
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        rep: Reply | None = None
        for _ in range(1_000_000):
            if rep is not None:
                (magic,) = struct.unpack(">I", self.recv_exact(4))
                assert magic == STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x}"
            flags, ctype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            if rep is None:
                rep = Reply(handle)
            assert handle == rep.handle, "chunks of two replies interleaved"
            rep.chunks.append(Chunk(flags, ctype, self.recv_exact(length)))
            if flags & REPLY_FLAG_DONE:
                return rep
        raise AssertionError("structured reply never finished")

    def call(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> Reply:
        handle = self.request(cmd, offset, length, flags, data)
        rep = self.recv_reply()
        assert rep.handle == handle, f"reply for handle {rep.handle}, expected {handle}"
        return rep

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """A read that must succeed; reassembles structured chunks."""
        rep = self.call(CMD_READ, offset, length, flags)
        assert rep.errno == 0, f"read failed: {rep.errno} {rep.chunk_errors()}"
        if not rep.structured:
            return rep.data
        return assemble_read(rep, offset, length)

    def disconnect(self) -> None:
        self.request(CMD_DISC)


def assemble_read(rep: Reply, offset: int, length: int) -> bytes:
    """Rebuild a structured read's bytes, checking the chunks cover it exactly once."""
    buf = bytearray(length)
    covered = bytearray(length)
    for c in rep.chunks:
        if c.type == REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack_from(">Q", c.payload)
            data = c.payload[8:]
            n = len(data)
            start = off - offset
            assert n > 0 and start >= 0 and start + n <= length, "data chunk out of bounds"
            buf[start : start + n] = data
        elif c.type == REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack(">QI", c.payload)
            start = off - offset
            assert n > 0 and start >= 0 and start + n <= length, "hole chunk out of bounds"
            buf[start : start + n] = bytes(n)
        elif c.type == REPLY_TYPE_NONE:
            assert c.flags & REPLY_FLAG_DONE and not c.payload
            continue
        else:
            raise AssertionError(f"unexpected chunk type {c.type} in a read reply")
        assert not any(covered[start : start + n]), "overlapping read chunks"
        covered[start : start + n] = b"\x01" * n
    assert all(covered), "read chunks do not cover the request"
    return bytes(buf)


__all__ = [  # noqa: RUF022 - the spec's numbers, then this client
    "CAN_MULTI_CONN",
    "CMD_BLOCK_STATUS",
    "CMD_CACHE",
    "CMD_DISC",
    "CMD_FLAG_DF",
    "CMD_FLAG_FAST_ZERO",
    "CMD_FLAG_FUA",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_REQ_ONE",
    "CMD_FLUSH",
    "CMD_READ",
    "CMD_TRIM",
    "CMD_WRITE",
    "CMD_WRITE_ZEROES",
    "C_FIXED_NEWSTYLE",
    "C_NO_ZEROES",
    "Chunk",
    "ClosedError",
    "EINVAL",
    "EIO",
    "ENOSPC",
    "ENOTSUP",
    "EOVERFLOW",
    "EPERM",
    "ESHUTDOWN",
    "ExportInfo",
    "FLAG_FIXED_NEWSTYLE",
    "FLAG_NO_ZEROES",
    "HAS_FLAGS",
    "IHAVEOPT",
    "INFO_BLOCK_SIZE",
    "INFO_DESCRIPTION",
    "INFO_EXPORT",
    "INFO_NAME",
    "NBDMAGIC",
    "OPT_ABORT",
    "OPT_EXPORT_NAME",
    "OPT_GO",
    "OPT_INFO",
    "OPT_LIST",
    "OPT_LIST_META_CONTEXT",
    "OPT_REPLY_MAGIC",
    "OPT_SET_META_CONTEXT",
    "OPT_STARTTLS",
    "OPT_STRUCTURED_REPLY",
    "OptError",
    "OptReply",
    "READ_ONLY",
    "REPLY_FLAG_DONE",
    "REPLY_TYPE_BLOCK_STATUS",
    "REPLY_TYPE_ERROR",
    "REPLY_TYPE_ERROR_OFFSET",
    "REPLY_TYPE_NONE",
    "REPLY_TYPE_OFFSET_DATA",
    "REPLY_TYPE_OFFSET_HOLE",
    "REP_ACK",
    "REP_ERR",
    "REP_ERR_INVALID",
    "REP_ERR_PLATFORM",
    "REP_ERR_POLICY",
    "REP_ERR_SHUTDOWN",
    "REP_ERR_TLS_REQD",
    "REP_ERR_UNKNOWN",
    "REP_ERR_UNSUP",
    "REP_INFO",
    "REP_META_CONTEXT",
    "REP_SERVER",
    "REQUEST_MAGIC",
    "RawNBD",
    "Reply",
    "SEND_CACHE",
    "SEND_DF",
    "SEND_FAST_ZERO",
    "SEND_FLUSH",
    "SEND_FUA",
    "SEND_TRIM",
    "SEND_WRITE_ZEROES",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "assemble_read",
]
