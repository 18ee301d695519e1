"""Spliced writes: large write payloads go from the socket to the backing file by splice(2)
(server/splice.py, docs/ARCHITECTURE.md "Spliced writes").

The splicer is tested on real sockets and files (payloads larger than its pipe, sent in uneven
pieces; a file that refuses the bytes; a client that vanishes mid-payload), and the server with
real clients: what lands on disk, which writes were spliced (the close line counts them), and a
write the file refuses is answered with its error while the connection goes on.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd
import pytest
from clients.util import (
    expect_nbd_error,
    handle,
    pattern,
    random_bytes,
    read_file_range,
    release,
    workdir,
)
from conftest import StartServer, require_tool

from nbdcrypt.backends.file import takes_splice
from nbdcrypt.server.splice import PayloadSplicer

MiB = 1 << 20


def send_in_pieces(peer: socket.socket, data: bytes, piece: int) -> threading.Thread:
    """A thread that sends `data` in pieces of `piece` bytes (as a slow client would)."""

    def run() -> None:
        for i in range(0, len(data), piece):
            peer.sendall(data[i : i + piece])

    t = threading.Thread(target=run)
    t.start()
    return t


@contextmanager
def splicing(
    path: Path, native: bool, flags: int = os.O_RDWR
) -> Iterator[tuple[socket.socket, socket.socket, PayloadSplicer, int]]:
    """(our socket, the peer's, a splicer, `path` opened with `flags`), all closed after."""
    ours, peer = socket.socketpair()
    splicer = PayloadSplicer(native=native)
    fd = os.open(path, flags)
    try:
        yield ours, peer, splicer, fd
    finally:
        os.close(fd)
        splicer.close()
        ours.close()
        peer.close()


@pytest.fixture(params=["C", "Python"])
def native(request: pytest.FixtureRequest) -> bool:
    """Each splicer test runs the C loop (_splice.c, built by the test command) and the
    Python one (installs without a compiler)."""
    return bool(request.param == "C")


def test_the_c_module_is_built() -> None:
    assert PayloadSplicer().native


@pytest.mark.parametrize("piece", [4096, 100_000, 3 * MiB])
def test_a_payload_lands_at_its_offset_and_the_next_request_follows(
    tmp_path: Path, piece: int, native: bool
) -> None:
    """3 MiB (three pipes' worth) in pieces of any size: the file holds them at the offset,
    the bytes around are untouched, and what the client sent next is still on the socket."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xee" * (8 * MiB))
    payload = random_bytes(3 * MiB, 1)
    with splicing(path, native) as (ours, peer, splicer, fd):
        t = send_in_pieces(peer, payload + b"NEXT", piece)
        assert splicer.move(ours.fileno(), len(payload), fd, 1 * MiB + 512) is None
        assert ours.recv(4, socket.MSG_WAITALL) == b"NEXT"
        t.join()
    assert read_file_range(path, 1 * MiB + 512, len(payload)) == payload
    assert read_file_range(path, 0, 1 * MiB + 512) == b"\xee" * (1 * MiB + 512)
    tail = 1 * MiB + 512 + len(payload)
    assert read_file_range(path, tail, 8 * MiB - tail) == b"\xee" * (8 * MiB - tail)


def test_a_file_that_refuses_gets_its_error_and_the_payload_is_still_consumed(
    tmp_path: Path, native: bool
) -> None:
    """Splicing to a descriptor opened read-only fails: move() returns the error, yet takes
    the whole payload off the socket, so the next request is read where it begins."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    with splicing(path, native, os.O_RDONLY) as (ours, peer, splicer, fd):
        t = send_in_pieces(peer, random_bytes(3 * MiB, 2) + b"NEXT", 65536)
        error = splicer.move(ours.fileno(), 3 * MiB, fd, 0)
        assert isinstance(error, OSError) and error.errno == errno.EBADF
        assert ours.recv(4, socket.MSG_WAITALL) == b"NEXT"
        t.join()
    assert read_file_range(path, 0, 4 * MiB) == bytes(4 * MiB)


def test_a_file_that_fills_up_midway(tmp_path: Path, native: bool) -> None:
    """A file that takes the first part of a payload and then refuses (a file size limit
    inside the payload, EFBIG): what it took is there, the error comes back, the rest of
    the payload is thrown away and the next request follows."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    script = (
        "import os, resource, socket, sys\n"
        "from nbdcrypt.server.splice import PayloadSplicer\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1536 * 1024, 1536 * 1024))\n"
        "ours = socket.socket(fileno=int(sys.argv[1]))\n"
        "fd = os.open(sys.argv[2], os.O_RDWR)\n"
        "splicer = PayloadSplicer(native=sys.argv[3] == '1')\n"
        "error = splicer.move(ours.fileno(), 3 << 20, fd, 1 << 20)\n"
        "print(error.errno if error else 0, ours.recv(4, socket.MSG_WAITALL).decode())\n"
    )
    ours, peer = socket.socketpair()
    payload = random_bytes(3 * MiB, 4)
    t = send_in_pieces(peer, payload + b"NEXT", 65536)
    try:
        out = subprocess.run(
            [sys.executable, "-c", script, str(ours.fileno()), str(path), "1" if native else "0"],
            pass_fds=[ours.fileno()],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        t.join()
    finally:
        ours.close()
        peer.close()
    assert out.stdout.split() == [str(errno.EFBIG), "NEXT"]
    assert read_file_range(path, 1 * MiB, 512 * 1024) == payload[: 512 * 1024]


def test_a_client_that_closes_inside_a_payload(tmp_path: Path, native: bool) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    with splicing(path, native) as (ours, peer, splicer, fd):
        peer.sendall(b"x" * 1000)
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):
            splicer.move(ours.fileno(), 65536, fd, 0)
    assert read_file_range(path, 0, 1000) == b"x" * 1000  # what came was written


def test_which_files_take_splice(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    ro = os.open(path, os.O_RDONLY)
    try:
        assert takes_splice(fd)
        assert not takes_splice(ro)
    finally:
        os.close(fd)
        os.close(ro)


CONFIG = """\
devices:
  disk0: {file: disk0.img, size: 64M}
  mapped:
    table:
      - 0 131072 linear disk0 0
exports:
  plain: {device: disk0, multi_conn: true}
  linear: {device: mapped}
"""


def close_lines(log: str, export: str) -> list[str]:
    return [line for line in log.splitlines() if f"closed export '{export}'" in line]


def spliced(line: str) -> int:
    found = re.search(r", (\d+) spliced", line)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("module", ["built", "missing"])
def test_nbdcopy_writes_are_spliced_and_land(
    tmp_path: Path, start_server: StartServer, module: str
) -> None:
    """nbdcopy (256 KiB writes on several connections) to a file export: every byte on disk,
    and the close lines say the writes were spliced; also by the Python loop, on an install
    without the C module."""
    src = tmp_path / "src.img"
    src.write_bytes(random_bytes(64 * MiB, 3))
    env = None
    if module == "missing":
        blocker = tmp_path / "no_c_module"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(
            "import sys\nsys.modules['nbdcrypt.server._splice'] = None  # as if never built\n"
        )
        env = {"PYTHONPATH": str(blocker)}
    server = start_server(CONFIG, env=env)
    subprocess.run(
        [require_tool("nbdcopy"), str(src), server.uri("plain")], check=True, timeout=120
    )
    assert server.stop() == 0
    img = workdir(server) / "disk0.img"
    assert img.read_bytes() == src.read_bytes()
    lines = close_lines(server.log, "plain")
    assert lines and sum(spliced(line) for line in lines) >= 64 * MiB // (256 * 1024) // 2


def test_what_is_not_spliced(start_server: StartServer) -> None:
    """Small writes, FUA writes and writes through a mapped device take the ordinary path
    (the close line counts no splice), and land all the same."""
    server = start_server(CONFIG)
    with handle(server.uri("plain")) as h:
        for i in range(8):
            h.pwrite(pattern(i, 4096), i * 4096)
        h.pwrite(pattern(8, 1 * MiB), 1 * MiB, nbd.CMD_FLAG_FUA)
    with handle(server.uri("linear")) as h:
        h.pwrite(pattern(9, 1 * MiB), 4 * MiB)
    assert server.stop() == 0
    img = workdir(server) / "disk0.img"
    for i in range(8):
        assert read_file_range(img, i * 4096, 4096) == pattern(i, 4096)
    assert read_file_range(img, 1 * MiB, 1 * MiB) == pattern(8, 1 * MiB)
    assert read_file_range(img, 4 * MiB, 1 * MiB) == pattern(9, 1 * MiB)
    for export in ("plain", "linear"):
        (line,) = close_lines(server.log, export)
        assert spliced(line) == 0, line


def test_a_write_the_file_refuses_gets_its_error_and_the_connection_goes_on(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The server runs with a file size limit of 8 MiB (RLIMIT_FSIZE): a spliced write past
    it fails with EFBIG, which the client gets as ENOSPC; the next write on the same
    connection, below the limit, lands, and the server serves on."""
    (tmp_path / "disk0.img").write_bytes(b"")
    os.truncate(tmp_path / "disk0.img", 64 * MiB)  # made here: the limit forbids ftruncate
    limit = tmp_path / "fsize_limit"
    limit.mkdir()
    (limit / "sitecustomize.py").write_text(
        "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))\n"
    )
    server = start_server(CONFIG, env={"PYTHONPATH": str(limit)})
    fua = nbd.CMD_FLAG_FUA
    with handle(server.uri("plain")) as h:
        # A FUA write is never spliced; after a large write the server reads the next header
        # alone, so each large write without flags after it is spliced (none before it is
        # surely: its header may come in one read with part of its payload).
        h.pwrite(pattern(0, 1 * MiB), 0, fua)
        expect_nbd_error(lambda: h.pwrite(pattern(1, 1 * MiB), 16 * MiB), errno.ENOSPC)
        h.pwrite(pattern(2, 1 * MiB), 2 * MiB)
        assert h.pread(1 * MiB, 2 * MiB) == pattern(2, 1 * MiB)
    with handle(server.uri("plain")) as h:
        h.pwrite(pattern(3, 1 * MiB), 3 * MiB, fua)
        h.pwrite(pattern(4, 1 * MiB), 4 * MiB)
    assert server.stop() == 0
    img = workdir(server) / "disk0.img"
    for i in (0, 2, 3, 4):
        assert read_file_range(img, i * MiB, 1 * MiB) == pattern(i, 1 * MiB)
    assert read_file_range(img, 16 * MiB, 1 * MiB) == bytes(1 * MiB)
    assert [spliced(line) for line in close_lines(server.log, "plain")] == [2, 1]


def test_pipelined_writes_reads_and_flushes_all_answered(start_server: StartServer) -> None:
    """libnbd with up to 32 requests in flight: 256 KiB writes (spliced; their replies go out
    from the connection thread before it takes the lock again) among 4 KiB reads of
    acknowledged writes and flushes (whose replies come from elsewhere). Every request
    completes without error, each read returns the acknowledged bytes, the file holds every
    write."""
    server = start_server(CONFIG)
    unit = 256 * 1024
    h = nbd.NBD()
    h.connect_uri(server.uri("plain"))
    written: dict[int, tuple[int, bytes]] = {}  # slot -> (cookie of its last write, data)
    reads: dict[int, tuple[nbd.Buffer, bytes]] = {}  # cookie -> (buffer, what it must hold)
    pending: set[int] = set()

    def settle(most: int) -> None:
        nonlocal pending
        deadline = time.monotonic() + 60
        while len(pending) > most:
            assert time.monotonic() < deadline, f"{len(pending)} requests never answered"
            h.poll(1)
            pending = {c for c in pending if not h.aio_command_completed(c)}

    try:
        for i in range(160):
            settle(31)
            slot = i  # each write its own place: a read of an acknowledged one stays valid
            data = pattern(i, unit)
            written[slot] = (h.aio_pwrite(data, slot * unit), data)
            pending.add(written[slot][0])
            acked = [s for s, (cookie, _) in written.items() if cookie not in pending]  # in order
            if i % 3 == 2 and acked:
                buf = nbd.Buffer(4096)
                cookie = h.aio_pread(buf, acked[-1] * unit + 8192)
                pending.add(cookie)
                reads[cookie] = (buf, written[acked[-1]][1][8192 : 8192 + 4096])
            if i % 16 == 15:
                pending.add(h.aio_flush())
        settle(0)
        assert len(reads) > 20
        for buf, expected in reads.values():
            assert buf.to_bytearray() == expected
    finally:
        release(h)
    assert server.stop() == 0
    img = workdir(server) / "disk0.img"
    for slot, (_, data) in written.items():
        assert read_file_range(img, slot * unit, unit) == data
    assert sum(spliced(line) for line in close_lines(server.log, "plain")) > 100
