"""The C call of a sealed write (_units.c land() through libcrypto.InPlace): a payload
encrypted as it arrives over a socket lands in its file as per-unit AES-XTS from
`cryptography`, however the sender cuts it, and the reply and the next header move; a sender
that stalls or trickles gets its bytes back as sent and nothing written; a file that refuses
the write gets nothing sent."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_crypto_xts import Case, reference

from nbdcrypt.crypto import XtsCipher, libcrypto

pytestmark = pytest.mark.skipif(not libcrypto.native(), reason="needs the _units C module")


@contextmanager
def sender(
    pieces: list[bytes], pause: float = 0.0, close: bool = False
) -> Iterator[tuple[int, socket.socket]]:
    """A socketpair whose far end a thread writes `pieces` into (sleeping `pause` between
    them, closing after them if `close`); yields the near end's descriptor and the far end
    (where replies arrive)."""
    near, far = socket.socketpair()

    def send() -> None:
        for piece in pieces:
            far.sendall(piece)
            time.sleep(pause)
        if close:
            far.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        yield near.fileno(), far
    finally:
        thread.join()
        near.close()
        far.close()


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for size in sizes:
        if at >= len(data):
            break
        pieces.append(data[at : at + size])
        at += size
    if at < len(data):
        pieces.append(data[at:])
    return pieces


def land(
    run: libcrypto.InPlace,
    buffer: bytearray,
    got: int,
    sock: int,
    fd: int,
    *,
    stall_ms: int = 5000,
    within_ms: int = 60_000,
    offset: int = 0,
    reply: bytes = b"",
    header: bytearray | None = None,
) -> tuple[int, int, int, int, int]:
    view = memoryview(header if header is not None else bytearray(0))
    return run.land(
        buffer,
        got,
        sock,
        stall_ms=stall_ms,
        within_ms=within_ms,
        fd=fd,
        offset=offset,
        reply=reply,
        header=view,
    )


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "disk", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    unit=st.sampled_from([512, 4096]),
    units=st.integers(1, 80),
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=12),
)
def test_a_payload_encrypted_as_it_arrives_lands_as_the_reference(
    seed: int, unit: int, units: int, sizes: list[int]
) -> None:
    """However the sender cuts the payload: the buffer and the file hold per-unit AES-XTS,
    the reply reaches the sender, and what came of the next header is exactly its bytes."""
    rng = np.random.default_rng(seed)
    case = Case(rng.bytes(64), rng.bytes(unit * units), int(rng.integers(0, 2**40)), unit)
    run = XtsCipher(case.key).in_place(case.first, unit, len(case.data))
    assert run is not None
    buffer, header, after = bytearray(len(case.data)), bytearray(28), rng.bytes(40)
    with tempfile.TemporaryFile() as file, sender([*cut(case.data, sizes), after]) as (sock, far):
        landed = land(run, buffer, 0, sock, file.fileno(), offset=512, reply=b"ok", header=header)
        got, code, err, sent, n = landed
        assert (got, code, err, sent) == (len(case.data), 0, 0, 2)
        assert far.recv(2, socket.MSG_WAITALL) == b"ok"
        assert header[:n] == after[:n]
        file.seek(512)
        assert file.read() == reference(case)
    assert bytes(buffer) == reference(case)


@pytest.mark.parametrize("unit", [512, 4096])
def test_a_stalled_sender_gets_its_bytes_back_as_sent(unit: int, disk: int) -> None:
    """Part of a payload, then silence past stall_ms: code 1, nothing written, and the bytes
    received are the plaintext again (the caller gives its keyslot back, receives the rest
    the ordinary way, then lands it whole)."""
    data = os.urandom(64 * unit)
    part = 10 * unit + 100  # whole units encrypted, then taken back, and a partial one
    run = XtsCipher(bytes(range(64))).in_place(3, unit, len(data))
    assert run is not None
    buffer = bytearray(len(data))
    with sender([data[:part], data[part:]], pause=0.5) as (sock, far):
        got, code, *_ = land(run, buffer, 0, sock, disk, stall_ms=50, reply=b"ok")
        assert (got, code) == (part, 1)
        assert bytes(buffer[:got]) == data[:part]
        assert os.fstat(disk).st_size == 0
        with socket.socket(fileno=os.dup(sock)) as rest:
            rest.recv_into(memoryview(buffer)[got:], len(data) - got, socket.MSG_WAITALL)
        assert land(run, buffer, len(data), sock, disk, reply=b"ok") == (len(data), 0, 0, 2, 0)
        assert far.recv(2, socket.MSG_WAITALL) == b"ok"
    assert os.pread(disk, len(data), 0) == reference(Case(bytes(range(64)), data, 3, unit))


def test_a_sender_that_trickles_is_cut_off_at_the_deadline(disk: int) -> None:
    """Never silent for stall_ms, but the payload not in within within_ms: code 1, as a
    stall (a tenant that trickles its payload keeps no keyslot from the others)."""
    data = os.urandom(64 * 4096)
    run = XtsCipher(bytes(range(64))).in_place(0, 4096, len(data))
    assert run is not None
    buffer = bytearray(len(data))
    with sender(cut(data, [4096] * 64), pause=0.02) as (sock, _):
        got, code, *_ = land(run, buffer, 0, sock, disk, stall_ms=1000, within_ms=200)
        assert code == 1
        assert 0 < got < len(data)  # cut off, not held until the trickle ended (~1.3 s)
        assert bytes(buffer[:got]) == data[:got]
        with socket.socket(fileno=os.dup(sock)) as rest:  # the sender's last pieces
            rest.recv_into(memoryview(buffer)[got:], len(data) - got, socket.MSG_WAITALL)
    assert bytes(buffer) == data


def test_a_sender_that_closes_inside_the_payload(disk: int) -> None:
    run = XtsCipher(bytes(range(64))).in_place(0, 4096, 8 * 4096)
    assert run is not None
    buffer = bytearray(8 * 4096)
    with sender([os.urandom(5000)], close=True) as (sock, _):
        assert land(run, buffer, 0, sock, disk)[:2] == (5000, 2)


def test_a_file_that_refuses_the_write_gets_no_reply(tmp_path: Path) -> None:
    """The write's errno comes back, and neither the reply nor the next header moves."""
    data = os.urandom(16 * 4096)
    run = XtsCipher(os.urandom(64)).in_place(9, 4096, len(data))
    assert run is not None
    (tmp_path / "disk").write_bytes(b"")
    readonly = os.open(tmp_path / "disk", os.O_RDONLY)
    try:
        with sender([b"next"]) as (sock, far):
            landed = land(run, bytearray(data), len(data), sock, readonly, reply=b"ok")
            assert landed == (len(data), 0, errno.EBADF, 0, 0)
            far.setblocking(False)
            with pytest.raises(BlockingIOError):
                far.recv(16)
    finally:
        os.close(readonly)
