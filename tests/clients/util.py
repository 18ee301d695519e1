"""Helpers shared by the real-client tests (tests/test_clients_*.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import RunningServer, launch_server, run
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MiB = 1024 * 1024

# The configuration most client tests use: a file device shared by a writable and a read-only
# export, a memory device, and a second file that no test writes to (for hole reports).
STANDARD_CONFIG = """\
devices:
  disk0: {file: disk0.img, size: 64M}
  sparse0: {file: sparse0.img, size: 64M}
  mem0: {memory: 64M}
exports:
  plain: {device: disk0, description: "a plain file", default: true}
  ro: {device: disk0, readonly: true, description: "the same file, read-only"}
  mem: {device: mem0, multi_conn: true, description: "in memory"}
  sparse: {device: sparse0, description: "never written"}
"""
EXPORT_SIZE = 64 * MiB
DESCRIPTIONS = {
    "plain": "a plain file",
    "ro": "the same file, read-only",
    "mem": "in memory",
    "sparse": "never written",
}


@contextmanager
def server_fixture(
    tmp_path_factory: pytest.TempPathFactory, config: str, name: str
) -> Iterator[RunningServer]:
    """A server shared by one test module; killed at the end if still running."""
    workdir = tmp_path_factory.mktemp(name)
    server = launch_server(workdir, config)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def workdir(server: RunningServer) -> Path:
    return server.config_path.parent


def connect(
    uri: str,
    *,
    strict: bool = True,
    structured: bool = True,
    meta: bool = True,
) -> Any:
    """A connected libnbd handle (strict=False lets it send what a server must reject)."""
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def release(h: Any) -> None:
    """Disconnect a libnbd handle now (1.14's Python binding has no close(): the handle is
    freed with the object, so shut the connection down explicitly where it is still up)."""
    try:
        if not h.aio_is_dead() and not h.aio_is_closed():
            h.shutdown()
    except nbd.Error:
        pass


@contextmanager
def handle(uri: str, **kw: bool) -> Iterator[Any]:
    h = connect(uri, **kw)
    try:
        yield h
    finally:
        release(h)


def pattern(tag: int, length: int) -> bytes:
    """`length` bytes that identify `tag` (and the 8-byte position within) everywhere."""
    assert length % 8 == 0
    words = length // 8
    return b"".join(struct.pack(">II", tag & 0xFFFFFFFF, i) for i in range(words))


def random_bytes(length: int, seed: int) -> bytes:
    """Deterministic incompressible bytes (SHAKE-256 stream)."""
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(length)


def sha256_file(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    left = length if length is not None else os.path.getsize(path)
    with path.open("rb") as f:
        while left > 0:
            block = f.read(min(left, 4 * MiB))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def read_file_range(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def nbdinfo_json(*args: str, timeout: float = 60) -> Any:
    proc = run(["nbdinfo", "--json", *args], timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"nbdinfo printed invalid JSON ({e}):\n{proc.stdout}") from e


def merge_extents(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join adjacent (offset, length, type) extents of the same type; checks they are contiguous."""
    out: list[tuple[int, int, int]] = []
    for off, length, typ in extents:
        assert length > 0, f"zero-length extent at {off}"
        if out:
            poff, plen, ptyp = out[-1]
            assert off == poff + plen, f"extents not contiguous: {out[-1]} then {(off, length)}"
            if typ == ptyp:
                out[-1] = (poff, plen + length, typ)
                continue
        out.append((off, length, typ))
    return out


def expect_nbd_error(fn: Callable[[], object], errnum: int) -> Any:
    """Run a libnbd call that must fail with exactly `errnum` (as the server sent it)."""
    try:
        result = fn()
    except nbd.Error as e:
        assert e.errnum == errnum, (
            f"expected {errno_name(errnum)}, got {errno_name(e.errnum)}: {e.string}"
        )
        # libnbd words errors from the server's reply so; its own checks read differently
        assert "command failed" in (e.string or ""), f"not the server's error: {e.string}"
        return e
    raise AssertionError(f"expected {errno_name(errnum)}, the request succeeded ({result!r:.80})")


def errno_name(n: int | None) -> str:
    return f"{errno.errorcode.get(n, '?')}({n})" if n is not None else "None"


__all__ = [
    "DESCRIPTIONS",
    "EXPORT_SIZE",
    "STANDARD_CONFIG",
    "MiB",
    "connect",
    "expect_nbd_error",
    "handle",
    "merge_extents",
    "nbdinfo_json",
    "pattern",
    "random_bytes",
    "read_file_range",
    "server_fixture",
    "sha256_file",
    "workdir",
]


def xts(key: bytes, unit: int, offset: int, data: bytes, *, encrypt: bool) -> bytes:
    """AES-256-XTS over whole data units, DUN = byte offset / unit, as blk-crypto does it."""
    out = bytearray()
    for at in range(0, len(data), unit):
        tweak = ((offset + at) // unit).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        op = cipher.encryptor() if encrypt else cipher.decryptor()
        out += op.update(data[at : at + unit]) + op.finalize()
    return bytes(out)
