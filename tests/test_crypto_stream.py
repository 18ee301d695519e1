"""The C calls of a sealed write (_units.c stream() and seal() through libcrypto.InPlace):
a payload encrypted as it arrives over a socket equals per-unit AES-XTS from `cryptography`,
however the sender cuts it; a sender that stalls gets its bytes back as sent; the tail writes
the ciphertext to its file and sends the reply."""

from __future__ import annotations

import errno
import os
import socket
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
def sender(pieces: list[bytes], pause: float = 0.0, close: bool = False) -> Iterator[int]:
    """A socketpair whose far end a thread writes `pieces` into (sleeping `pause` between
    them, closing after them if `close`); yields the near end's descriptor."""
    near, far = socket.socketpair()
    near.setblocking(True)

    def send() -> None:
        for piece in pieces:
            far.sendall(piece)
            time.sleep(pause)
        if close:
            far.close()

    thread = threading.Thread(target=send)
    thread.start()
    try:
        yield near.fileno()
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


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    unit=st.sampled_from([512, 4096]),
    units=st.integers(1, 80),
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=12),
)
def test_a_payload_encrypted_as_it_arrives_equals_the_reference(
    seed: int, unit: int, units: int, sizes: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    case = Case(rng.bytes(64), rng.bytes(unit * units), int(rng.integers(0, 2**40)), unit)
    run = XtsCipher(case.key).in_place(case.first, unit, len(case.data))
    assert run is not None
    buffer = bytearray(len(case.data))
    with sender(cut(case.data, sizes)) as fd:
        got, code = run.stream(buffer, fd, 5000, 60_000)
    assert (got, code) == (len(case.data), 0)
    assert bytes(buffer) == reference(case)


@pytest.mark.parametrize("unit", [512, 4096])
def test_a_stalled_sender_gets_its_bytes_back_as_sent(unit: int) -> None:
    """Part of a payload, then silence past stall_ms: code 1 and the received bytes are the
    plaintext again (the caller gives its keyslot back and goes on the ordinary way)."""
    data = os.urandom(64 * unit)
    part = 10 * unit + 100  # whole units encrypted, then taken back, and a partial one
    run = XtsCipher(bytes(range(64))).in_place(3, unit, len(data))
    assert run is not None
    buffer = bytearray(len(data))
    with sender([data[:part], data[part:]], pause=0.5) as fd:
        got, code = run.stream(buffer, fd, 50, 60_000)
        assert (got, code) == (part, 1)
        assert bytes(buffer[:got]) == data[:part]
        seal_rest = socket.socket(fileno=os.dup(fd))
        with seal_rest:
            seal_rest.recv_into(memoryview(buffer)[got:], len(data) - got, socket.MSG_WAITALL)
    run(buffer)
    assert bytes(buffer) == reference(Case(bytes(range(64)), data, 3, unit))


def test_a_sender_that_trickles_is_cut_off_at_the_deadline() -> None:
    """Never silent for stall_ms, but the payload not in within within_ms: code 1, as a
    stall (a tenant that trickles its payload keeps no keyslot from the others)."""
    data = os.urandom(64 * 4096)
    run = XtsCipher(bytes(range(64))).in_place(0, 4096, len(data))
    assert run is not None
    buffer = bytearray(len(data))
    with sender(cut(data, [4096] * 64), pause=0.02) as fd:
        got, code = run.stream(buffer, fd, 1000, 200)
        assert code == 1
        assert 0 < got < len(data)  # cut off, not held until the trickle ended (~1.3 s)
        assert bytes(buffer[:got]) == data[:got]
        with socket.socket(fileno=os.dup(fd)) as rest:
            rest.recv_into(memoryview(buffer)[got:], len(data) - got, socket.MSG_WAITALL)
    assert bytes(buffer) == data


def test_a_sender_that_closes_inside_the_payload() -> None:
    run = XtsCipher(bytes(range(64))).in_place(0, 4096, 8 * 4096)
    assert run is not None
    buffer = bytearray(8 * 4096)
    with sender([os.urandom(5000)], close=True) as fd:
        assert run.stream(buffer, fd, 5000, 60_000) == (5000, 2)


@pytest.mark.parametrize("unit", [512, 4096])
def test_the_tail_writes_the_ciphertext_and_sends_the_reply(unit: int, tmp_path: Path) -> None:
    """seal(): what stream() left (skip = all of it), or all of it (skip = 0), encrypted,
    written at its offset, then the reply sent; a file that refuses the write gets its errno
    back and no reply goes."""
    key, data = os.urandom(64), os.urandom(16 * unit)
    expected = reference(Case(key, data, 9, unit))
    path = tmp_path / "disk"
    path.write_bytes(bytes(unit) + bytes(len(data)))
    fd = os.open(path, os.O_RDWR)
    near, far = socket.socketpair()
    try:
        for skip in (0, len(data) // 2, len(data)):
            run = XtsCipher(key).in_place(9, unit, len(data))
            assert run is not None
            buffer = bytearray(data)
            if skip:
                first = XtsCipher(key).in_place(9, unit, skip)
                assert first is not None
                first(memoryview(buffer)[:skip])
            code = run.seal(buffer, skip, fd=fd, offset=unit, sock=near.fileno(), reply=b"done")
            assert code == (0, 4)
            assert far.recv(16) == b"done"
            assert path.read_bytes()[unit:] == expected
        readonly = os.open(path, os.O_RDONLY)
        try:
            run = XtsCipher(key).in_place(9, unit, len(data))
            assert run is not None
            code = run.seal(
                bytearray(data), 0, fd=readonly, offset=0, sock=near.fileno(), reply=b"x"
            )
            assert code == (errno.EBADF, 0)
            far.setblocking(False)
            with pytest.raises(BlockingIOError):
                far.recv(16)
        finally:
            os.close(readonly)
    finally:
        os.close(fd)
        near.close()
        far.close()
