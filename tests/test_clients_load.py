"""Many clients at once, and SIGTERM in the middle of a write load.

The promise under test: nothing acknowledged is ever lost. Every write carries a tag that names
it, writes never overlap, and after the server has exited the backing file is read directly.
"""

from __future__ import annotations

import errno
import fcntl
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
import pytest
from clients import rawnbd as rn
from clients.util import MiB, handle, pattern, read_file_range, release, workdir
from conftest import RunningServer, StartServer, require_tool

LOAD_CONFIG = """\
devices:
  disk0: {file: disk0.img, size: 64M}
  disk1: {file: disk1.img, size: 32M}
  mem0: {memory: 32M}
exports:
  plain: {device: disk0, default: true}
  small: {device: disk1}
  mem: {device: mem0, multi_conn: true}
"""
BLOCK = 64 * 1024


def tag(writer: int, seq: int) -> int:
    return (writer << 20) | seq


# ---------------------------------------------------------------- several clients at once


def test_concurrent_libnbd_writers_multi_conn(start_server: StartServer) -> None:
    server = start_server(LOAD_CONFIG)
    n_writers, region = 4, 8 * MiB
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            with handle(server.uri("plain", tcp=bool(i % 2))) as h:
                assert h.can_multi_conn()
                for seq in range(region // BLOCK):
                    flags = nbd.CMD_FLAG_FUA if seq % 8 == 0 else 0
                    h.pwrite(pattern(tag(i, seq), BLOCK), i * region + seq * BLOCK, flags)
                h.flush()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(n_writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert not errors, errors

    backing = workdir(server) / "disk0.img"
    with handle(server.uri("plain")) as h:
        for i in range(n_writers):
            for seq in range(0, region // BLOCK, 7):
                want = pattern(tag(i, seq), BLOCK)
                off = i * region + seq * BLOCK
                assert bytes(h.pread(BLOCK, off)) == want, (i, seq)
    for i in range(n_writers):
        got = read_file_range(backing, i * region, region)
        want = b"".join(pattern(tag(i, s), BLOCK) for s in range(region // BLOCK))
        assert got == want, f"writer {i}'s region differs in the backing file"


def test_concurrent_qemu_io_processes(start_server: StartServer) -> None:
    require_tool("qemu-io")
    server = start_server(LOAD_CONFIG)
    procs: list[subprocess.Popen[str]] = []
    for i in range(4):
        base = i * 8 * MiB
        cmds = []
        for k in range(8):
            cmds += ["-c", f"aio_write -P 0x{0x40 + i:x} {base + k * MiB} 1M"]
        cmds += ["-c", "aio_flush", "-c", f"read -P 0x{0x40 + i:x} {base} 8M"]
        uri = server.uri("plain" if i % 2 else "mem", tcp=i >= 2)
        procs.append(
            subprocess.Popen(
                ["qemu-io", "-f", "raw", uri, *cmds],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("qemu-io hung") from None
        outputs.append((p.returncode, out))
    for rc, out in outputs:
        assert rc == 0 and "Pattern verification failed" not in out, out
    backing = workdir(server) / "disk0.img"
    for i in (1, 3):
        assert read_file_range(backing, i * 8 * MiB, 8 * MiB) == bytes([0x40 + i]) * 8 * MiB
    with handle(server.uri("mem")) as h:
        for i in (0, 2):
            assert bytes(h.pread(8 * MiB, i * 8 * MiB)) == bytes([0x40 + i]) * 8 * MiB


def test_nbdcopy_between_two_exports_of_one_server(start_server: StartServer) -> None:
    require_tool("nbdcopy")
    server = start_server(LOAD_CONFIG)
    data = b"".join(pattern(tag(9, s), BLOCK) for s in range(32 * MiB // BLOCK))
    with handle(server.uri("small")) as h:
        for off in range(0, len(data), 4 * MiB):
            h.pwrite(data[off : off + 4 * MiB], off)
        h.flush()
    # file export -> memory export, both ends multi-conn on the same server, both transports
    proc = subprocess.run(
        ["nbdcopy", "--connections=2", "--requests=8", server.uri("small", tcp=True),
         server.uri("mem")],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with handle(server.uri("mem")) as h:
        assert bytes(h.pread(32 * MiB, 0)) == data


# ---------------------------------------------------------------- SIGTERM under load


@dataclass
class Writer:
    """One connection keeping `depth` FUA/plain writes in flight, each to a fresh block."""

    index: int
    uri: str
    base: int
    blocks: int
    depth: int = 8
    acked: list[int] = field(default_factory=list)  # seqs acknowledged as written
    failed: list[tuple[int, int | None, str]] = field(default_factory=list)  # (seq, errnum, msg)
    ended: str = ""
    exception: BaseException | None = None

    def offset(self, seq: int) -> int:
        return self.base + seq * BLOCK

    def run(self, stop_at: float) -> None:
        try:
            self._run(stop_at)
        except BaseException as e:
            self.exception = e

    def _run(self, stop_at: float) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        pending: dict[int, int] = {}  # cookie -> seq
        seq = 0
        try:
            while time.monotonic() < stop_at:
                while len(pending) < self.depth and seq < self.blocks:
                    flags = nbd.CMD_FLAG_FUA if seq % 3 == 0 else 0
                    data = pattern(tag(self.index, seq), BLOCK)
                    try:
                        cookie = h.aio_pwrite(data, self.offset(seq), flags=flags)
                    except nbd.Error as e:
                        self.ended = f"submit: {e.string} ({e.errnum})"
                        return
                    pending[cookie] = seq
                    seq += 1
                    if seq % 16 == 0:
                        try:
                            h.aio_flush()
                        except nbd.Error as e:
                            self.ended = f"flush submit: {e.string} ({e.errnum})"
                            return
                if not pending and seq >= self.blocks:
                    self.ended = "all written"
                    return
                try:
                    h.poll(1)
                except nbd.Error as e:
                    self.ended = f"poll: {e.string} ({e.errnum})"
                    return
                for cookie in list(pending):
                    try:
                        done = h.aio_command_completed(cookie)
                    except nbd.Error as e:
                        self.failed.append((pending.pop(cookie), e.errnum, e.string or ""))
                        continue
                    if done:
                        self.acked.append(pending.pop(cookie))
                if h.aio_is_dead() or h.aio_is_closed():
                    self.ended = "connection closed"
                    return
            self.ended = "time limit"
        finally:
            release(h)


def run_writers(writers: list[Writer], seconds: float) -> list[threading.Thread]:
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=w.run, args=(stop_at,), daemon=True) for w in writers]
    for t in threads:
        t.start()
    return threads


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# errors a client may see for the requests the server will no longer serve
SHUTDOWN_ERRNOS = {errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE}


@pytest.mark.parametrize("n_writers", [1, 3])
def test_sigterm_during_write_load_loses_no_acked_write(
    start_server: StartServer, n_writers: int
) -> None:
    server = start_server(LOAD_CONFIG)
    region = 64 * MiB // n_writers // BLOCK * BLOCK
    writers = [
        Writer(i, server.uri("plain", tcp=bool(i % 2)), i * region, region // BLOCK)
        for i in range(n_writers)
    ]
    threads = run_writers(writers, seconds=40)
    # let the load get going, then SIGTERM by pid while writes are in flight
    wait_for(lambda: sum(len(w.acked) for w in writers) >= 40, 30, "the first acked writes")
    acked_before = {w.index: len(w.acked) for w in writers}
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise AssertionError(f"server ignored SIGTERM under load:\n{server.log}") from None
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client hung after the server exited"
    assert code == 0, f"exit status {code}:\n{server.log[-4000:]}"

    backing = workdir(server) / "disk0.img"
    lost = []
    for w in writers:
        assert w.exception is None, w.exception
        assert w.ended != "time limit", "the server kept serving after SIGTERM"
        assert len(w.acked) >= acked_before[w.index]
        for seq in w.acked:
            if read_file_range(backing, w.offset(seq), BLOCK) != pattern(tag(w.index, seq), BLOCK):
                lost.append((w.index, seq))
        for seq, errnum, msg in w.failed:
            assert errnum in SHUTDOWN_ERRNOS, f"writer {w.index} seq {seq}: {msg} ({errnum})"
    assert not lost, f"acknowledged writes missing from the backing file: {lost[:10]}"
    assert "Traceback" not in server.log, server.log[-4000:]


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02])
def test_sigterm_pipelined_raw_writes_every_reply_is_true(
    start_server: StartServer, delay: float
) -> None:
    """A raw client streams writes without waiting; SIGTERM lands mid-stream. Every reply is
    success or ESHUTDOWN, each handle is answered at most once, and every success is on disk."""
    server = start_server(LOAD_CONFIG)
    sent: dict[int, int] = {}  # handle -> seq
    send_error: list[BaseException] = []
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        c.opt_go("plain")

        def sender() -> None:
            try:
                for seq in range(256):
                    flags = rn.CMD_FLAG_FUA if seq % 2 else 0
                    data = pattern(tag(7, seq), BLOCK)
                    handle_ = c.request(rn.CMD_WRITE, seq * BLOCK, BLOCK, flags, data)
                    sent[handle_] = seq
            except (rn.ClosedError, OSError) as e:
                send_error.append(e)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        time.sleep(delay)
        server.proc.send_signal(signal.SIGTERM)
        replies: dict[int, int] = {}
        try:
            for _ in range(300):
                rep = c.recv_reply()
                assert rep.handle not in replies, f"handle {rep.handle} answered twice"
                replies[rep.handle] = rep.errno
        except rn.ClosedError:
            pass
        except TimeoutError:
            raise AssertionError("the server neither answered nor closed") from None
        t.join(30)
        assert not t.is_alive()
    assert server.stop(timeout=30) == 0, server.log[-4000:]
    assert set(replies) <= set(sent), "a reply for a handle never sent"
    assert set(replies.values()) <= {0, rn.ESHUTDOWN}, replies
    backing = workdir(server) / "disk0.img"
    for h, err in replies.items():
        if err == 0:
            seq = sent[h]
            got = read_file_range(backing, seq * BLOCK, BLOCK)
            assert got == pattern(tag(7, seq), BLOCK), f"acked write {seq} is not on disk"
    # once ESHUTDOWN was sent for a request, no later request succeeds
    order = sorted(replies)
    first_refused = next((h for h in order if replies[h] == rn.ESHUTDOWN), None)
    if first_refused is not None:
        later_ok = [h for h in order if h > first_refused and replies[h] == 0]
        assert not later_ok, f"writes acked after the server refused {first_refused}: {later_ok}"


def test_clients_that_vanish_do_not_hurt_the_server(start_server: StartServer) -> None:
    """Clients die at awkward moments: mid-payload, with unread replies queued, with a reset in
    the handshake. The server keeps serving, logs no traceback and still exits 0."""
    server = start_server(LOAD_CONFIG)
    # half a write payload, then gone
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_go("plain")
        c.send(struct.pack(">IHHQQI", rn.REQUEST_MAGIC, 0, rn.CMD_WRITE, 1, 0, BLOCK))
        c.send(bytes(BLOCK // 2))
    # many large reads in flight, replies never read (nbdkit 1.32 aborts on this one)
    for export in ("plain", "mem"):
        with rn.RawNBD.tcp(server.port) as c:
            c.start()
            c.opt_structured_reply()
            c.opt_go(export)
            for i in range(32):
                c.request(rn.CMD_READ, i * MiB, 1 * MiB)
    # a reset in the middle of the handshake
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.recv(8)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    # a reset with writes in flight
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        c.opt_go("plain")
        for i in range(8):
            c.request(rn.CMD_WRITE, i * BLOCK, BLOCK, 0, pattern(tag(5, i), BLOCK))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    data = pattern(0xA11, BLOCK)
    with handle(server.uri("plain", tcp=True)) as h:
        h.pwrite(data, 32 * MiB, nbd.CMD_FLAG_FUA)
        assert bytes(h.pread(BLOCK, 32 * MiB)) == data
    assert server.proc.poll() is None, server.log[-4000:]
    assert server.stop(timeout=20) == 0, server.log[-4000:]
    assert "Traceback" not in server.log, server.log[-4000:]


def test_sigkill_keeps_fua_and_flushed_writes(start_server: StartServer) -> None:
    """FUA and FLUSH promise persistence at the reply. A SIGKILL cannot fsync, so what they
    covered must already be in the backing file (at least in the kernel's page cache) when the
    reply is sent: a user-space write-back cache would fail this."""
    server = start_server(LOAD_CONFIG)
    backing = workdir(server) / "disk0.img"
    with handle(server.uri("plain")) as h:
        for seq in range(16):
            h.pwrite(pattern(tag(3, seq), BLOCK), seq * BLOCK, nbd.CMD_FLAG_FUA)
        for seq in range(16, 48):
            h.pwrite(pattern(tag(3, seq), BLOCK), seq * BLOCK)
        h.flush()
        h.zero(BLOCK, 48 * BLOCK, nbd.CMD_FLAG_FUA)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    for seq in range(48):
        assert read_file_range(backing, seq * BLOCK, BLOCK) == pattern(tag(3, seq), BLOCK), seq
    assert read_file_range(backing, 48 * BLOCK, BLOCK) == bytes(BLOCK)


def test_sigterm_with_idle_clients_exits_promptly(start_server: StartServer) -> None:
    server = start_server(LOAD_CONFIG)
    h1 = nbd.NBD()
    h1.connect_uri(server.uri("plain"))
    h2 = nbd.NBD()
    h2.connect_uri(server.uri("mem", tcp=True))
    data = pattern(0x1D1E, BLOCK)
    h1.pwrite(data, 0)  # acknowledged, not flushed: the server fsyncs on the way out
    t0 = time.monotonic()
    code = server.stop(signal.SIGTERM, timeout=20)
    assert code == 0, server.log[-4000:]
    assert time.monotonic() - t0 < 15, "idle connections held up the shutdown"
    for h in (h1, h2):
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
        release(h)
    assert read_file_range(workdir(server) / "disk0.img", 0, BLOCK) == data


def listener_closed(server: RunningServer) -> bool:
    if server.proc.poll() is not None:
        return True
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=1):
            return False
    except OSError:
        return True


def test_request_after_sigterm_gets_eshutdown_or_close(start_server: StartServer) -> None:
    server = start_server(LOAD_CONFIG)
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        c.opt_go("plain")
        assert c.call(rn.CMD_WRITE, 0, 4096, data=pattern(1, 4096)).errno == 0
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: listener_closed(server), 15, "the server to stop accepting")
        try:
            rep = c.call(rn.CMD_READ, 0, 4096)
        except rn.ClosedError:
            pass
        else:
            assert rep.errno == rn.ESHUTDOWN, rep
    assert server.stop(timeout=20) == 0, server.log[-4000:]
    assert "Traceback" not in server.log, server.log[-4000:]


def test_new_clients_refused_after_sigterm(start_server: StartServer) -> None:
    server = start_server(LOAD_CONFIG)
    with handle(server.uri("plain")) as h:
        h.pwrite(pattern(2, 4096), 0, nbd.CMD_FLAG_FUA)
    assert server.stop(timeout=20) == 0, server.log[-4000:]
    with pytest.raises(nbd.Error):
        nbd.NBD().connect_uri(server.uri("plain", tcp=True))
    with pytest.raises(nbd.Error):
        nbd.NBD().connect_uri(server.uri("plain"))


def test_unix_replies_larger_than_the_default_socket_buffer_leave_at_once(
    start_server: StartServer,
) -> None:
    """A client that asks for 4 MiB and does not read yet finds more queued for it than a
    unix socket's default send buffer (208 KiB) holds: the server enlarged its buffer, so a
    256 KiB read reply leaves in one send, not two with an epoll round between."""
    server = start_server(LOAD_CONFIG)
    default = int(Path("/proc/sys/net/core/wmem_default").read_text())
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_go("plain")
        c.request(rn.CMD_READ, 0, 4 * MiB)
        queued = 0
        for _ in range(100):  # until the server's sends stop growing the queue
            time.sleep(0.05)
            now = struct.unpack("i", fcntl.ioctl(c.sock, termios.FIONREAD, b"\0" * 4))[0]
            if now == queued and now > 0:
                break
            queued = now
        assert queued > default, f"only {queued} bytes queued (default buffer {default})"
        reply = c.recv_reply()
        assert reply.error == 0 and len(reply.data) == 4 * MiB
