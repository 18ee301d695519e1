"""`server.io`: connections on threads (the default) and on the one event loop serve alike.

With `io: threads` a connection's requests run on its own thread under the loop's lock, and
a request that has to wait (a delay target, a keyslot) finishes on the loop, whose reply then
leaves from there while the thread sleeps in recv(). These tests run the same real clients
against both modes and check the bytes on disk.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import nbd
import pytest
from clients import rawnbd as rn
from clients.util import MiB, handle, pattern, read_file_range, workdir
from conftest import RunningServer, StartServer, run

from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import IoMode
from nbdcrypt.server.lockedloop import LockedLoop
from nbdcrypt.threadrole import on_connection_thread, unlocked

CONFIG = """\
server: {{io: {io}{extra}}}
devices:
  disk0: {{file: disk0.img, size: 32M}}
  slow: {{table: ['0 16384 delay disk0 0 5 disk0 0 30', '16384 49152 linear disk0 16384']}}
exports:
  plain: {{device: disk0, default: true}}
  slow: {{device: slow}}
"""
BLOCK = 64 * 1024


@pytest.mark.parametrize("io", ["threads", "loop"])
def test_pipelined_writes_with_late_replies_land(start_server: StartServer, io: str) -> None:
    """64 writes in flight on one connection, a quarter of them through a delay leg that
    finishes them on the loop: every reply arrives, every byte is on disk, in both modes."""
    server = start_server(CONFIG.format(io=io, extra=""))
    expected = "on threads" if io == "threads" else "on the event loop"
    assert f"connections run {expected}" in server.log
    h = nbd.NBD()
    h.connect_uri(server.uri("slow"))
    try:
        cookies = []
        for i in range(64):
            offset = (i // 4) * BLOCK if i % 4 == 0 else 8 * MiB + i * BLOCK
            flags = nbd.CMD_FLAG_FUA if i % 8 == 0 else 0
            cookies.append(h.aio_pwrite(pattern(i, BLOCK), offset, flags=flags))
        while h.aio_in_flight():
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)  # each retired once, no error
        h.flush()
        for i in range(0, 64, 4):
            assert h.pread(BLOCK, (i // 4) * BLOCK) == pattern(i, BLOCK)
    finally:
        h.shutdown()
    img = workdir(server) / "disk0.img"
    for i in range(64):
        if i % 4:
            assert read_file_range(img, 8 * MiB + i * BLOCK, BLOCK) == pattern(i, BLOCK)
    assert server.stop() == 0
    assert "Traceback" not in server.log


@pytest.mark.parametrize("io", ["threads", "loop"])
def test_nbdcopy_round_trip(start_server: StartServer, io: str, tmp_path: Path) -> None:
    """nbdcopy in (4 connections, multi-conn) and out again: the same bytes."""
    server = start_server(
        CONFIG.format(io=io, extra="").replace("default: true", "multi_conn: true")
    )
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(b"".join(pattern(i, MiB) for i in range(32)))
    run(["nbdcopy", "--connections=4", str(src), server.uri("plain")])
    run(["nbdcopy", server.uri("plain"), str(back)])
    assert back.read_bytes() == src.read_bytes()
    assert (workdir(server) / "disk0.img").read_bytes() == src.read_bytes()
    assert server.stop() == 0


def test_slow_reader_does_not_stall_the_others(start_server: StartServer) -> None:
    """A client that asks for far more than its cap and never reads: its thread stops
    reading, and other clients on other threads are served meanwhile."""
    server = start_server(CONFIG.format(io="threads", extra=", limits: {max_inflight_bytes: 4M}"))
    with open_raw(server, "plain") as c:
        for _ in range(64):
            c.request(rn.CMD_READ, 0, 4 * MiB)  # 256 MiB of replies asked; none read
        with handle(server.uri("plain")) as h:
            h.pwrite(b"\x5a" * 4096, 0, nbd.CMD_FLAG_FUA)
            assert h.pread(4096, 0) == b"\x5a" * 4096
    assert server.stop() == 0


def open_raw(server: RunningServer, export: str) -> rn.RawNBD:
    """A unix-socket session in transmission after NBD_OPT_EXPORT_NAME (simple replies); a
    lost reply fails the test at the timeout instead of hanging it."""
    c = rn.RawNBD.unix(server.socket_path, timeout=60)
    c.start()
    c.export_name(export)
    return c


def test_late_replies_through_a_full_socket_arrive_whole(start_server: StartServer) -> None:
    """48 reads of 1 MiB through a delay leg finish on the loop while the client reads
    nothing: their replies fill the socket and the rest leaves from an executor thread. Read
    afterwards, every reply is whole, once, with its request's bytes."""
    server = start_server(CONFIG.format(io="threads", extra=""))
    data = b"".join(pattern(i, MiB) for i in range(8))
    with (workdir(server) / "disk0.img").open("r+b") as f:
        f.write(data)  # the delay leg's first 8 MiB
    with open_raw(server, "slow") as c:
        handles = {c.request(rn.CMD_READ, i % 8 * MiB, MiB): i for i in range(48)}
        time.sleep(0.5)  # not a measurement: lets the replies pile up unread
        got: dict[int, bytes] = {}
        for _ in range(48):
            reply = c.recv_reply()
            assert reply.error == 0 and reply.handle not in got
            got[reply.handle] = reply.data
    got = {handles[h]: data for h, data in got.items()}
    assert got == {i: data[i % 8 * MiB : (i % 8 + 1) * MiB] for i in range(48)}
    assert server.stop() == 0
    assert "Traceback" not in server.log


def test_late_and_immediate_replies_never_interleave(start_server: StartServer) -> None:
    """Reads through the delay leg (replied from the loop, header and data in two writes)
    mixed with reads the thread answers itself, 64 in flight for 4000 requests: every reply
    reaches libnbd whole (a header parted from its data is a protocol error there). The race
    that once parted them needs more clients than this to show often; tests/test_stress_ci.py
    (32 clients on two-slot engines) is the one that caught it."""
    server = start_server(CONFIG.format(io="threads", extra=""))
    data = b"".join(pattern(i, MiB) for i in range(16))
    with (workdir(server) / "disk0.img").open("r+b") as f:
        f.write(data)  # 8 MiB behind the delay leg, 8 MiB behind the linear one
    h = nbd.NBD()
    h.connect_uri(server.uri("slow"))
    try:
        pending: dict[int, tuple[bytearray, int]] = {}
        issued = 0
        while issued < 4000 or pending:
            while issued < 4000 and len(pending) < 64:
                offset = (issued * 7 % 16) * MiB + (issued % 5) * 65536
                buf = bytearray(65536)
                pending[h.aio_pread(buf, offset)] = (buf, offset)
                issued += 1
            h.poll(-1)
            for cookie in [c for c in pending if h.aio_command_completed(c)]:
                buf, offset = pending.pop(cookie)
                assert buf == data[offset : offset + 65536], offset
    finally:
        h.shutdown()
    assert server.stop() == 0


def test_io_mode_in_the_config(tmp_path: Path) -> None:
    base = "devices:\n  m: {memory: 1M}\nexports:\n  e: {device: m}\n"
    path = tmp_path / "c.yaml"
    path.write_text("server: {listen: unix:///tmp/x.sock}\n" + base)
    assert load_config(path).server.io is IoMode.THREADS
    path.write_text("server: {listen: unix:///tmp/x.sock, io: loop}\n" + base)
    assert load_config(path).server.io is IoMode.LOOP
    path.write_text("server:\n  listen: unix:///tmp/x.sock\n  io: fibers\n" + base)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}:3: server.io: unknown io mode 'fibers': expected threads or loop"
    )


def test_locked_loop_wakes_for_work_another_thread_schedules() -> None:
    """A future completed on another thread (under the lock) wakes the loop out of epoll;
    without the wake-up the loop would sleep through the 30 s timeout."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, LockedLoop)
        fut: asyncio.Future[int] = loop.create_future()

        def other() -> None:
            with loop.lock:
                fut.set_result(7)

        threading.Timer(0.2, other).start()
        return await asyncio.wait_for(fut, 30)

    with asyncio.Runner(loop_factory=LockedLoop) as runner:
        assert runner.run(main()) == 7


def test_unlocked_lets_other_threads_take_the_lock() -> None:
    async def main() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, LockedLoop)
        while_held = loop.lock.acquire(blocking=False)  # the loop's callbacks hold it
        got: list[bool] = []
        with unlocked():
            t = threading.Thread(target=lambda: got.append(loop.lock.acquire(timeout=30)))
            t.start()
            t.join()
            loop.lock.release()
        return while_held, got == [True], on_connection_thread()

    with asyncio.Runner(loop_factory=LockedLoop) as runner:
        assert runner.run(main()) == (False, True, False)
    with unlocked():  # no LockedLoop running: nothing to let go of
        pass
