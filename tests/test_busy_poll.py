"""`server.busy_poll`: a connection thread polls its socket for the next request when the client
waits on each reply, and sleeps otherwise (server/poll.py, docs/ARCHITECTURE.md).

Tests never assert timings: they check what was received and which way it was received (the
poller's counters, the close line of the log), with budgets far above any scheduling delay.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from clients.util import handle, pattern, read_file_range, workdir
from conftest import StartServer

from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import DEFAULT_BUSY_POLL
from nbdcrypt.config.units import parse_duration
from nbdcrypt.server.poll import SocketPoller


@dataclass
class Census:
    connection_threads: int = 1


def exchange(poller: SocketPoller, count: int, gap: float) -> bytes:
    """`count` messages from a peer thread that sends each `gap` seconds after the server side
    took the one before (a client that waits for each reply); what the poller received."""
    ours, peer = socket.socketpair()
    took = threading.Semaphore(0)
    got = bytearray()

    def client() -> None:
        for i in range(count):
            time.sleep(gap)
            peer.sendall(i.to_bytes(4, "big"))
            took.acquire()

    t = threading.Thread(target=client)
    t.start()
    buf = memoryview(bytearray(4))
    try:
        for _ in range(count):
            n = 0
            while n < 4:
                n += poller.recv_into(ours, buf[n:])
            got += buf
            took.release()
    finally:
        t.join()
        ours.close()
        peer.close()
    return bytes(got)


def expected(count: int) -> bytes:
    return b"".join(i.to_bytes(4, "big") for i in range(count))


def test_a_client_that_waits_on_each_reply_is_polled_for() -> None:
    poller = SocketPoller(0.05, Census())
    assert exchange(poller, 200, 0) == expected(200)
    # The first few sleep while the mean comes down from 8 budgets; later ones may sleep too
    # where a poll found the CPU shared with the peer (it backs off), but some polls receive.
    assert poller.hits > 0 and poller.sleeps >= 1
    assert poller.hits + poller.misses + poller.sleeps == 200


def test_a_slow_client_is_never_polled_for() -> None:
    poller = SocketPoller(0.001, Census())
    assert exchange(poller, 20, 0.02) == expected(20)
    assert (poller.hits, poller.misses, poller.sleeps) == (0, 0, 20)


def test_polling_only_for_the_servers_one_connection() -> None:
    """With two vCPUs a polling thread takes a CPU that other clients need: a second
    connection stops polling, and polling comes back when it has gone."""
    census = Census(connection_threads=2)
    poller = SocketPoller(0.05, census)
    assert exchange(poller, 50, 0) == expected(50)
    assert (poller.hits, poller.misses, poller.sleeps) == (0, 0, 50)
    census.connection_threads = 1
    assert exchange(poller, 200, 0) == expected(200)
    assert poller.hits > 0


def test_a_poll_that_runs_out_sleeps_and_still_receives() -> None:
    """Fast requests bring polling on; one that comes long after the budget ends a poll in a
    miss, and the bytes still arrive (the blocking receive that follows)."""
    poller = SocketPoller(0.002, Census())
    ours, peer = socket.socketpair()
    buf = memoryview(bytearray(1))
    try:
        for _ in range(20):
            peer.send(b"x")
            assert poller.recv_into(ours, buf) == 1
        assert poller.hits > 0
        sleeps = poller.sleeps
        late = threading.Timer(0.2, peer.send, (b"y",))
        late.start()
        assert poller.recv_into(ours, buf) == 1 and buf[0] == ord("y")
        late.join()
        # A poll that missed; on a loaded machine a fast poll above may have found its CPU
        # shared, and then this receive sleeps without polling (the back-off).
        assert poller.misses + poller.sleeps - sleeps == 1
    finally:
        ours.close()
        peer.close()


def test_the_config_key(tmp_path: Path) -> None:
    base = "devices:\n  m: {memory: 1M}\nexports:\n  e: {device: m}\n"
    path = tmp_path / "c.yaml"
    cases = {"": DEFAULT_BUSY_POLL, ", busy_poll: 0": 0.0, ", busy_poll: 50us": 50e-6}
    for extra, seconds in cases.items():
        path.write_text(f"server: {{listen: unix:///tmp/x.sock{extra}}}\n" + base)
        assert load_config(path).server.busy_poll == pytest.approx(seconds)
    assert parse_duration("250 US") == pytest.approx(250e-6)
    errors = {
        "1s": "server.busy_poll: '1s' is too long (at most 10ms)",
        "soon": "server.busy_poll: invalid duration 'soon'",
    }
    for value, message in errors.items():
        path.write_text(f"server:\n  listen: unix:///tmp/x.sock\n  busy_poll: {value}\n" + base)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert str(err.value).startswith(f"{path}:3: {message}")


CONFIG = """\
server: {{busy_poll: {poll}}}
devices:
  disk0: {{file: disk0.img, size: 8M}}
exports:
  e: {{device: disk0, default: true}}
"""


@pytest.mark.parametrize("poll", ["5ms", "0"])
def test_a_depth_one_client_with_and_without_polling(start_server: StartServer, poll: str) -> None:
    """libnbd writing and reading 4 KiB at a time, each waiting for its reply: the bytes land
    either way, and the close line says how many requests polling received (none when off)."""
    server = start_server(CONFIG.format(poll=poll))
    with handle(server.uri("e")) as h:
        for i in range(300):
            h.pwrite(pattern(i, 4096), i * 4096)
        for i in range(300):
            assert h.pread(4096, i * 4096) == pattern(i, 4096)
        h.flush()
    assert server.stop() == 0
    img = workdir(server) / "disk0.img"
    for i in range(0, 300, 7):
        assert read_file_range(img, i * 4096, 4096) == pattern(i, 4096)
    closed = [line for line in server.log.splitlines() if "closed export 'e'" in line]
    assert closed and "requests" in closed[-1]
    if poll == "0":
        assert "busy polling" not in server.log
    else:
        polled = int(closed[-1].split(", ")[-1].split()[0])
        assert polled > 0, closed[-1]  # most, unless a busy machine made polling back off


def test_without_the_c_module_polling_is_off(tmp_path: Path, start_server: StartServer) -> None:
    """An install without a compiler: the server says busy polling is off, and a depth-1
    client is served by sleeping receives (nothing received by polling)."""
    blocker = tmp_path / "no_c_module"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['nbdcrypt.server._spin'] = None  # as if never built\n"
    )
    server = start_server(CONFIG.format(poll="5ms"), env={"PYTHONPATH": str(blocker)})
    assert "busy polling: no C module built" in server.log
    with handle(server.uri("e")) as h:
        for i in range(100):
            h.pwrite(pattern(i, 4096), i * 4096)
            assert h.pread(4096, i * 4096) == pattern(i, 4096)
    assert server.stop() == 0
    assert "busy polling" not in server.log.split("no C module built")[1]
