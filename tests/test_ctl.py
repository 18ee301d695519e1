"""Live control: the control socket in the server and `nbdcrypt ctl`, against real clients.

What is promised (docs/OPERATIONS.md): dmsetup's commands and outputs; a clear one-line error
for every bad request; `suspend` returns once in-flight I/O has drained and new I/O waits;
`resume` swaps in a loaded table; a client sees only a pause, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest
from clients.util import MiB, handle, nbdinfo_json, pattern, read_file_range, workdir
from conftest import ROOT, RunningServer, StartServer, require_tool, run

from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.control.commands import ControlError, Controller
from nbdcrypt.control.protocol import ControlRequest
from nbdcrypt.control.server import ControlServer
from nbdcrypt.device import Device
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, parse_table
from nbdcrypt.targets import TARGETS

CONFIG = """\
devices:
  a: {file: a.img, size: 16M}
  b: {file: b.img, size: 16M}
  pool: {table: ["0 32768 linear a 0"]}
exports:
  pool: {device: pool}
"""

STACK_CONFIG = """\
devices:
  a: {file: a.img, size: 16M}
  b: {file: b.img, size: 16M}
  pool: {table: ["0 32768 linear a 0"]}
  top: {table: ["0 32768 linear pool 0"]}
exports:
  pool: {device: pool}
  top: {device: top}
"""

TWO_EXPORTS_CONFIG = CONFIG + "  other: {device: b}\n"

BLOCK = 64 * 1024


@dataclass
class Ctl:
    """A server started with --control, and `nbdcrypt ctl -s` pointed at it."""

    server: RunningServer
    path: Path

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return nbdcrypt("ctl", "-s", str(self.path), *args, stdin=stdin)

    def ok(self, *args: str) -> str:
        out = self(*args)
        assert out.returncode == 0, f"ctl {' '.join(args)}: {out.returncode}\n{out.stderr}"
        assert out.stderr == ""
        return out.stdout

    def fails(self, *args: str) -> str:
        """The error line of a command that must fail with exit status 1."""
        out = self(*args)
        assert out.returncode == 1, f"ctl {' '.join(args)}: {out.returncode}\n{out.stdout}"
        assert out.stdout == ""
        assert out.stderr.startswith("nbdcrypt ctl: "), out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
        return out.stderr.removeprefix("nbdcrypt ctl: ").rstrip("\n")

    def request(self, *lines: bytes) -> list[dict[str, object]]:
        """Send raw request lines on one connection; the replies, in order."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.path))
            s.sendall(b"".join(lines))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return [json.loads(line) for line in data.splitlines()]


def nbdcrypt(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdcrypt", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def start_ctl(start_server: StartServer, tmp_path: Path, config: str = CONFIG) -> Ctl:
    path = tmp_path / "control.sock"
    return Ctl(start_server(config, "--control", str(path)), path)


@pytest.fixture
def ctl(start_server: StartServer, tmp_path: Path) -> Ctl:
    return start_ctl(start_server, tmp_path)


@pytest.fixture
def stack(start_server: StartServer, tmp_path: Path) -> Ctl:
    return start_ctl(start_server, tmp_path, STACK_CONFIG)


def size_of(server: RunningServer, export: str) -> int:
    size: int = nbdinfo_json(server.uri(export))["exports"][0]["export-size"]
    return size


# ---------------------------------------------------------------- the socket


def test_socket_is_0600_replaces_a_stale_one_and_is_removed_at_shutdown(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed server leaves behind
    os.chmod(path, 0o777)
    server = start_server(CONFIG, "--control", str(path))
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert Ctl(server, path).ok("ls")
    assert server.stop() == 0
    assert not path.exists()
    assert "Traceback" not in server.log


def test_no_control_socket_without_the_option(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(CONFIG)
    assert not list(tmp_path.glob("*control*"))
    out = nbdcrypt("ctl", "-s", str(tmp_path / "control.sock"), "ls")
    assert out.returncode == 1
    assert out.stderr == (
        f"nbdcrypt ctl: no control socket at {tmp_path / 'control.sock'} (is the server "
        "running, with server.control or --control?)\n"
    )
    assert server.stop() == 0


def test_ctl_finds_the_socket_in_the_config(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    config = f"server:\n  listen: tcp://127.0.0.1:1\n  control: unix://{path}\n" + CONFIG
    server = start_server(config)
    out = nbdcrypt("ctl", "-c", str(server.config_path), "ls")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a     file\nb     file\npool  table\n"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_ctl_usage_errors_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server: {listen: tcp://127.0.0.1:1}\n" + CONFIG)
    sock = str(tmp_path / "control.sock")
    cases = [
        (["ctl", "ls"], "one of the arguments -s/--socket -c/--config is required"),
        (["ctl", "-s", sock, "-c", str(cfg), "ls"], "not allowed with argument"),
        (["ctl", "-s", sock], "the following arguments are required: COMMAND"),
        (["ctl", "-s", sock, "frobnicate"], "invalid choice: 'frobnicate'"),
        (["ctl", "-s", sock, "load", "pool"], "give the table as FILE, as - (standard input)"),
        (["ctl", "-s", sock, "load", "pool", "t.txt", "--table", "0 1 zero"], "give the table"),
        (["ctl", "-s", sock, "suspend"], "the following arguments are required: DEV"),
        (["ctl", "-s", sock, "status", "a", "b"], "unrecognized arguments: b"),
        (["ctl", "-c", str(cfg), "ls"], "has no server.control; give the socket with -s"),
    ]
    for args, message in cases:
        out = nbdcrypt(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- looking


def test_ls_status_table_info(ctl: Ctl) -> None:
    assert ctl.ok("ls") == "a     file\nb     file\npool  table\n"
    crypto = "a: crypto: none\nb: crypto: none\npool: crypto: none\n"
    assert ctl.ok("status") == "pool: 0 32768 linear\n" + crypto
    assert ctl.ok("status", "pool") == "0 32768 linear\n"
    assert ctl.ok("table") == "pool: 0 32768 linear a 0\n"
    assert ctl.ok("table", "pool") == "0 32768 linear a 0\n"
    assert ctl.ok("table", "--inactive", "pool") == ""
    assert ctl.ok("info", "pool") == (
        "Name:             pool\n"
        "Kind:             table\n"
        "State:            ACTIVE\n"
        "Tables present:   LIVE\n"
        "Open count:       0\n"
        "Size:             32768 sectors (16777216 bytes)\n"
        "Devices below:    a\n"
        "Used by:          none\n"
        "Inline crypto:    none (passthrough)\n"
        "Fallback bytes:   0\n"
    )
    assert ctl.ok("info", "a") == (
        "Name:             a\n"
        "Kind:             file\n"
        "State:            ACTIVE\n"
        "Tables present:   none\n"
        "Open count:       0\n"
        "Size:             32768 sectors (16777216 bytes)\n"
        "Devices below:    none\n"
        "Used by:          pool\n"
        "Inline crypto:    none (engine)\n"
        "Fallback bytes:   0\n"
    )
    everything = ctl.ok("info")
    assert everything.split("\n\n")[0].startswith("Name:             a\n")
    assert [b.splitlines()[0] for b in everything.split("\n\n")] == [
        f"Name:             {n}" for n in ("a", "b", "pool")
    ]
    with handle(ctl.server.uri("pool")):
        assert "Open count:       1\n" in ctl.ok("info", "pool")


def test_load_resume_clear_and_what_each_shows(ctl: Ctl, tmp_path: Path) -> None:
    table = tmp_path / "split.table"
    table.write_text(
        "# the same data, in two lines\n0 16384 linear a 0\n\n16384 16384 linear b 0\n"
    )
    assert ctl.ok("load", "pool", str(table)) == ""
    assert ctl.ok("table", "pool") == "0 32768 linear a 0\n"
    assert ctl.ok("table", "--inactive", "pool") == "0 16384 linear a 0\n16384 16384 linear b 0\n"
    info = ctl.ok("info", "pool")
    assert "Tables present:   LIVE & INACTIVE\n" in info
    assert "State:            ACTIVE\n" in info
    assert ctl.ok("resume", "pool") == (
        "pool: resumed with the new table, 32768 sectors (16777216 bytes)\n"
    )
    assert ctl.ok("table", "pool") == "0 16384 linear a 0\n16384 16384 linear b 0\n"
    assert ctl.ok("status").startswith("pool: 0 16384 linear\npool: 16384 16384 linear\na: crypto")
    assert "Devices below:    a, b\n" in ctl.ok("info", "pool")
    assert "Used by:          pool\n" in ctl.ok("info", "b")
    assert ctl.ok("resume", "pool") == (
        "pool: resumed, no inactive table was loaded (the live table stays)\n"
    )
    # standard input, then clear: the live table stays
    out = ctl("load", "pool", "-", stdin="0 32768 zero\n")
    assert out.returncode == 0, out.stderr
    assert ctl.ok("table", "--inactive", "pool") == "0 32768 zero\n"
    assert ctl.ok("clear", "pool") == ""
    assert "Tables present:   LIVE\n" in ctl.ok("info", "pool")
    assert ctl.ok("table", "pool") == "0 16384 linear a 0\n16384 16384 linear b 0\n"
    # suspend, then resume without a table
    assert ctl.ok("suspend", "pool") == ""
    assert "State:            SUSPENDED\n" in ctl.ok("info", "pool")
    assert ctl.ok("suspend", "pool") == ""  # again: still suspended, no error
    assert ctl.ok("resume", "pool").startswith("pool: resumed, no inactive table")
    assert "State:            ACTIVE\n" in ctl.ok("info", "pool")


# ---------------------------------------------------------------- errors


def test_command_errors_are_one_clear_line(stack: Ctl) -> None:
    ctl = stack
    known = "(known: a, b, pool, top)"
    cases = [
        (("status", "nosuch"), f"unknown device 'nosuch' {known}"),
        (("info", "nosuch"), f"unknown device 'nosuch' {known}"),
        (("resume", "nosuch"), f"unknown device 'nosuch' {known}"),
        (("table", "a"), "'a' is a file device, not a table device"),
        (("suspend", "b"), "'b' is a file device, not a table device"),
        (("load", "a", "--table", "0 32768 zero"), "'a' is a file device, not a table device"),
        (
            ("load", "pool", "--table", "0 100 linear a 0", "--table", "100 100 frob"),
            f"load pool: line 2: unknown target 'frob' (known: {', '.join(sorted(TARGETS))})",
        ),
        (
            ("load", "pool", "--table", "0 100 linear a"),
            "load pool: line 1: linear: takes 2 arguments (<dev> <offset>), got 1",
        ),
        (
            ("load", "pool", "--table", "0 100 zero", "--table", "200 100 zero"),
            "load pool: line 2: starts at sector 200, leaving a gap after 100",
        ),
        (
            ("load", "pool", "--table", "0 100 zero", "--table", "100 100 linear c 0"),
            f"load pool: line 2: unknown device 'c' {known}",
        ),
        (
            ("load", "pool", "--table", "0 100 linear pool 0"),
            "load pool: line 1: a table cannot map its own device 'pool'",
        ),
        (
            ("load", "pool", "--table", "0 100 linear top 0"),
            "load pool: line 1: 'top' has 'pool' below it; mapping it would make a loop",
        ),
        (
            ("load", "pool", "--table", "0 32768 linear a 8"),
            "load pool: line 1: maps sectors 8-32775 of 'a', which has only 32768 sectors",
        ),
        (
            ("load", "pool", "--table", "0 16384 linear a 0"),
            "load pool: 'top' maps sectors up to 32768 of 'pool' (line 1 of its live table), "
            "past the new end at 16384 sectors",
        ),
    ]
    for args, message in cases:
        assert ctl.fails(*args) == message, args
    out = ctl("load", "pool", str(workdir(ctl.server) / "missing.table"))
    assert out.returncode == 1
    assert out.stderr.endswith("missing.table: No such file or directory\n")
    # nothing was loaded by any of it, and the server serves on
    assert "Tables present:   LIVE\n" in ctl.ok("info", "pool")
    assert size_of(ctl.server, "top") == 16 * MiB


def test_protocol_errors_keep_the_connection(ctl: Ctl) -> None:
    replies = ctl.request(
        b"this is not json\n",
        b"[1, 2]\n",
        b"{}\n",
        b'{"command": 7}\n',
        b'{"command": "frob"}\n',
        b'{"command": "load", "device": "pool"}\n',
        b'{"command": "ls", "device": "pool"}\n',
        b'{"command": "status", "device": 3}\n',
        b'{"command": "load", "device": "pool", "table": "0 8 zero"}\n',
        b'{"command": "table", "inactive": "yes"}\n',
        b"\xff\xfe\n",
        b"   \n",  # blank lines are skipped
        b'{"command": "status", "device": "pool"}\n',
    )
    errors = [
        "malformed request: not JSON (Expecting value: line 1 column 1 (char 0))",
        "malformed request: expected a JSON object, got a list",
        "malformed request: missing 'command'",
        "malformed request: 'command' must be a string, not a number",
        "unknown command 'frob' (known: clear, evict-key, info, load, ls, reload, resume, status, "
        "suspend, table)",
        "load: missing argument 'table'",
        "ls: unexpected argument 'device'",
        "status: 'device' must be a string, not a number",
        "load: 'table' must be a list of strings (the table's lines)",
        "table: 'inactive' must be true or false",
        "malformed request: not UTF-8",
    ]
    assert replies == [{"ok": False, "error": e} for e in errors] + [
        {"ok": True, "output": "0 32768 linear"}
    ]


def test_an_overlong_line_is_refused_and_the_server_goes_on(ctl: Ctl) -> None:
    replies = ctl.request(b'{"command": "ls", "x": "' + b"y" * (1024 * 1024) + b'"}\n')
    assert replies == [{"ok": False, "error": "request line longer than 1048576 bytes"}]
    assert ctl.ok("status", "pool") == "0 32768 linear\n"


# ---------------------------------------------------------------- sizes


def test_grow_then_shrink_only_once_closed(ctl: Ctl) -> None:
    server = ctl.server
    old = nbd.NBD()
    old.connect_uri(server.uri("pool"))
    try:
        old.pwrite(b"\xa5" * BLOCK, 0)
        ctl.ok("load", "pool", "--table", "0 32768 linear a 0", "--table", "32768 32768 linear b 0")
        assert ctl.ok("resume", "pool") == (
            "pool: resumed with the new table, 65536 sectors (33554432 bytes)\n"
        )
        assert size_of(server, "pool") == 32 * MiB  # a new connection sees the new size
        assert old.get_size() == 16 * MiB  # the old one keeps its own, and keeps working
        old.pwrite(b"\x5a" * BLOCK, 16 * MiB - BLOCK)
        assert bytes(old.pread(BLOCK, 0)) == b"\xa5" * BLOCK
        with handle(server.uri("pool")) as new:
            new.pwrite(b"\x3c" * BLOCK, 32 * MiB - BLOCK)
            assert bytes(new.pread(BLOCK, 16 * MiB - BLOCK)) == b"\x5a" * BLOCK
        assert read_file_range(workdir(server) / "b.img", 16 * MiB - BLOCK, BLOCK) == (
            b"\x3c" * BLOCK
        )
        # shrinking while a client has it open is refused
        assert ctl.fails("load", "pool", "--table", "0 16384 linear a 0") == (
            "load pool: the new table has 16384 sectors, fewer than the live table's 65536, "
            "and 1 client(s) have pool open; shrink it after they disconnect"
        )
        assert "Tables present:   LIVE\n" in ctl.ok("info", "pool")
        old.flush()
    finally:
        old.shutdown()
    # ... and allowed once it is closed
    deadline = time.monotonic() + 10
    while "Open count:       0\n" not in ctl.ok("info", "pool"):
        assert time.monotonic() < deadline, "the closed connection still counts as an opener"
        time.sleep(0.05)
    ctl.ok("load", "pool", "--table", "0 16384 linear a 0")
    assert ctl.ok("resume", "pool").startswith("pool: resumed with the new table, 16384 sectors")
    assert size_of(server, "pool") == 8 * MiB
    with handle(server.uri("pool")) as h:
        assert bytes(h.pread(BLOCK, 0)) == b"\xa5" * BLOCK


def test_resume_refuses_to_shrink_under_an_opener_and_stays_suspended(ctl: Ctl) -> None:
    """A table loaded before the client came: the check at resume still holds."""
    ctl.ok("load", "pool", "--table", "0 16384 linear a 0")
    ctl.ok("suspend", "pool")
    with handle(ctl.server.uri("pool")) as h:
        assert ctl.fails("resume", "pool") == (
            "resume pool: cannot shrink from 32768 to 16384 sectors while 1 client(s) have it "
            "open; pool stays suspended (clear drops the inactive table)"
        )
        assert "State:            SUSPENDED\n" in ctl.ok("info", "pool")
        ctl.ok("clear", "pool")
        assert ctl.ok("resume", "pool").startswith("pool: resumed, no inactive table")
        assert bytes(h.pread(512, 0)) == bytes(512)


# ---------------------------------------------------------------- under load


@dataclass
class PatternClient:
    """One libnbd connection keeping `depth` writes and verifying reads in flight, in rounds
    over `blocks` blocks; it remembers what each block must hold."""

    uri: str
    blocks: int
    depth: int = 8
    expected: dict[int, int] = field(default_factory=dict)  # block -> tag acknowledged last
    completed: int = 0  # requests completed successfully
    errors: list[str] = field(default_factory=list)
    exception: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, deadline: float) -> None:
        try:
            self._run(deadline)
        except BaseException as e:  # reported by the test
            self.exception = e

    def _run(self, deadline: float) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        pending: dict[int, tuple[str, int, int, bytearray | None]] = {}  # cookie -> op
        n = 0
        try:
            while not (self.stop.is_set() and not pending):
                if time.monotonic() > deadline:
                    raise AssertionError("the client load did not finish in time")
                while not self.stop.is_set() and len(pending) < self.depth:
                    block, tag_ = n % self.blocks, n + 1
                    flags = nbd.CMD_FLAG_FUA if n % 5 == 0 else 0
                    cookie = h.aio_pwrite(pattern(tag_, BLOCK), block * BLOCK, flags=flags)
                    pending[cookie] = ("write", block, tag_, None)
                    old = (n - 64) % self.blocks  # written a while ago, nothing in flight on it
                    if n % 3 == 0 and old in self.expected:
                        buf = bytearray(BLOCK)
                        cookie = h.aio_pread(buf, old * BLOCK)
                        pending[cookie] = ("read", old, self.expected[old], buf)
                    n += 1
                h.poll(1)
                for cookie in list(pending):
                    try:
                        done = h.aio_command_completed(cookie)
                    except nbd.Error as e:
                        op, block, tag_, _ = pending.pop(cookie)
                        self.errors.append(f"{op} of block {block}: {e.string}")
                        continue
                    if not done:
                        continue
                    op, block, tag_, got = pending.pop(cookie)
                    if op == "write":
                        self.expected[block] = tag_
                    elif bytes(got or b"") != pattern(tag_, BLOCK):
                        self.errors.append(f"read of block {block}: not the data of tag {tag_}")
                    self.completed += 1
            h.flush()
        finally:
            h.shutdown()


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_suspend_load_resume_under_a_client_load_loses_nothing(ctl: Ctl) -> None:
    """Three swaps while a client writes and verifies: split table, data moved from a to b
    while suspended, split again. The client sees pauses, never an error."""
    server = ctl.server
    client = PatternClient(server.uri("pool"), blocks=16 * MiB // BLOCK)
    thread = threading.Thread(target=client.run, args=(time.monotonic() + 120,), daemon=True)
    thread.start()
    tables = [
        ["0 8192 linear a 0", "8192 24576 linear a 8192"],
        ["0 32768 linear b 0"],  # after copying a to b while suspended: the data moves
        ["0 16384 linear b 0", "16384 16384 linear b 16384"],
    ]
    try:
        for i, table in enumerate(tables):
            at_least = client.completed + 200
            wait_until(lambda: client.completed >= at_least, 60, "client progress")  # noqa: B023
            ctl.ok("suspend", "pool")  # returns once in-flight I/O has drained
            held = client.completed
            assert "State:            SUSPENDED\n" in ctl.ok("info", "pool")
            time.sleep(0.5)
            assert client.completed == held, "I/O completed on a suspended device"
            if i == 1:
                shutil.copyfile(workdir(server) / "a.img", workdir(server) / "b.img")
            ctl.ok("load", "pool", *(arg for line in table for arg in ("--table", line)))
            assert ctl.ok("resume", "pool").startswith("pool: resumed with the new table")
            assert client.exception is None, client.exception
        wait_until(lambda: client.completed >= held + 200, 60, "progress after the last resume")
    finally:
        client.stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the client hung"
    assert client.exception is None, client.exception
    assert client.errors == []
    assert len(client.expected) == client.blocks  # every block was written at least once
    with handle(server.uri("pool")) as h:
        for block, tag_ in client.expected.items():
            assert bytes(h.pread(BLOCK, block * BLOCK)) == pattern(tag_, BLOCK), block
    assert server.stop() == 0
    for block, tag_ in client.expected.items():
        got = read_file_range(workdir(server) / "b.img", block * BLOCK, BLOCK)
        assert got == pattern(tag_, BLOCK), f"block {block} differs in b.img"
    assert "Traceback" not in server.log


def test_a_suspended_lower_device_holds_the_upper_devices_io(stack: Ctl) -> None:
    server = stack.server
    with handle(server.uri("top")) as h:
        h.pwrite(b"\x77" * BLOCK, 0)
        stack.ok("suspend", "pool")
        buf = bytearray(BLOCK)
        cookie = h.aio_pread(buf, 0)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            h.poll(0)
            assert not h.aio_command_completed(cookie), "a read went through a suspended device"
            time.sleep(0.05)
        # load a table into the upper device while the lower one is suspended: it may be
        # suspended too (its in-flight read waits below), then both resumed
        stack.ok("load", "top", "--table", "0 32768 linear pool 0")
        stack.ok("resume", "pool")
        wait_until(lambda: h.poll(0) is not None and h.aio_command_completed(cookie), 30, "read")
        assert bytes(buf) == b"\x77" * BLOCK
        assert stack.ok("resume", "top").startswith("top: resumed with the new table")
        assert bytes(h.pread(BLOCK, 0)) == b"\x77" * BLOCK


def test_flakey_table_under_a_client_then_healthy_again(
    start_server: StartServer, tmp_path: Path
) -> None:
    require_tool("qemu-io")
    ctl = start_ctl(start_server, tmp_path, TWO_EXPORTS_CONFIG)
    server = ctl.server

    def qemu_io(export: str, *cmds: str) -> str:
        args = [a for c in cmds for a in ("-c", c)]
        return run(
            ["qemu-io", "-f", "raw", server.uri(export), *args], timeout=60, check=False
        ).stdout

    with handle(server.uri("pool")) as h:
        h.pwrite(b"\x11" * BLOCK, 0)
        # always down: up 0 s, down an hour
        ctl.ok("load", "pool", "--table", "0 32768 flakey a 0 0 3600")
        ctl.ok("resume", "pool")
        assert ctl.ok("status", "pool") == "0 32768 flakey down\n"
        with pytest.raises(nbd.Error) as info:
            h.pread(BLOCK, 0)
        assert info.value.errnum == errno.EIO
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"\x22" * BLOCK, 0)
        assert info.value.errnum == errno.EIO
        out = qemu_io("pool", "write -P 0x33 0 64k", "read -P 0x11 0 64k")
        assert "write failed: Input/output error" in out, out
        assert "read failed: Input/output error" in out, out
        # another export of the same server serves on throughout
        out = qemu_io("other", "write -P 0x44 0 1M", "read -P 0x44 0 1M")
        assert "failed" not in out and "Pattern verification" not in out, out
        # the healthy table back: the same connection works again
        ctl.ok("load", "pool", "--table", "0 32768 linear a 0")
        ctl.ok("resume", "pool")
        assert bytes(h.pread(BLOCK, 0)) == b"\x11" * BLOCK
        h.pwrite(b"\x55" * BLOCK, BLOCK)
    out = qemu_io("pool", f"read -P 0x55 {BLOCK} 64k", "write -P 0x66 1M 1M", "read -P 0x66 1M 1M")
    assert "failed" not in out and "Pattern verification" not in out, out
    assert server.stop() == 0
    assert read_file_range(workdir(server) / "a.img", 0, BLOCK) == b"\x11" * BLOCK


def test_sigterm_while_suspended_finishes_the_held_io(ctl: Ctl) -> None:
    server = ctl.server
    h = nbd.NBD()
    h.connect_uri(server.uri("pool"))
    try:
        ctl.ok("suspend", "pool")
        cookie = h.aio_pwrite(b"\x99" * BLOCK, 0)
        time.sleep(0.2)
        assert server.stop() == 0
        wait_until(lambda: h.poll(0) is not None and h.aio_command_completed(cookie), 10, "write")
    finally:
        if not h.aio_is_dead():
            h.shutdown()
    assert read_file_range(workdir(server) / "a.img", 0, BLOCK) == b"\x99" * BLOCK
    assert "device pool is suspended at shutdown: resuming it on its live table" in server.log
    assert not ctl.path.exists()


# ---------------------------------------------------------------- in process


def devices_for() -> dict[str, Device]:
    devices: dict[str, Device] = {"a": MemoryDevice("a", 16 * MiB)}
    devices["pool"] = MappedDevice(
        "pool", Table.build(parse_table(["0 32768 linear a 0"]), devices)
    )
    devices["top"] = MappedDevice("top", Table.build(parse_table(["0 8 linear a 0"]), devices))
    return devices


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[ControlServer]:
    server = ControlServer(Controller(devices_for()), tmp_path / "c.sock", idle_timeout=0.3)
    await server.start()
    yield server
    await server.close()


async def test_idle_clients_are_disconnected(control: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(control.path))
    writer.write(b'{"command": "ls"}\n')
    assert json.loads(await reader.readline()) == {
        "ok": True,
        "output": "a     memory\npool  table\ntop   table",
    }
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after 0.3 s of silence
    writer.close()


async def test_a_live_socket_is_not_taken_and_a_file_is_not_replaced(
    control: ControlServer, tmp_path: Path
) -> None:
    other = ControlServer(Controller(devices_for()), control.path)
    with pytest.raises(OSError, match="another server is listening on it"):
        await other.start()
    assert control.path.exists()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(OSError, match="the path exists and is not a socket"):
        await ControlServer(Controller(devices_for()), plain).start()
    assert plain.read_text() == "x"


async def test_an_inactive_table_counts_for_loops_and_ends(tmp_path: Path) -> None:
    devices = devices_for()
    ctl = Controller(devices)
    # top's inactive table maps pool: pool may not then map top (a loop once both resume)
    await ctl.execute(ControlRequest("load", "top", ("0 8 linear pool 0",)))
    with pytest.raises(ControlError, match="'top' has 'pool' below it"):
        await ctl.execute(ControlRequest("load", "pool", ("0 8 linear top 0",)))
    # pool's smaller inactive table, loaded before top's: resume checks it against top's
    await ctl.execute(ControlRequest("clear", "top"))
    await ctl.execute(ControlRequest("load", "pool", ("0 4 linear a 0",)))
    await ctl.execute(ControlRequest("load", "top", ("0 8 linear pool 0",)))
    with pytest.raises(
        ControlError,
        match=r"'top' maps sectors up to 8 of 'pool' \(line 1 of its "
        r"inactive table\), past the new end at 4 sectors; pool keeps its live",
    ):
        await ctl.execute(ControlRequest("resume", "pool"))
    assert devices["pool"].size == 16 * MiB


CRYPTO_CONFIG = """\
keys:
  k4: {mode: aes-256-xts, data_unit_size: 4096, source: {file: k4.key, create: true}}
  k5: {mode: aes-256-xts, data_unit_size: 512, source: {file: k5.key, create: true}}
devices:
  disk:
    file: disk.img
    size: 8M
    inline_crypto: {keyslots: 2, modes: {aes-256-xts: [4096]}, max_dun_bytes: 8}
  raw:
    memory: 8M
    inline_crypto: {keyslots: 0, modes: {aes-256-xts: [512, 4096]}, max_dun_bytes: 4}
  top: {table: ["0 16384 linear disk 0"]}
exports:
  inline: {device: top, key: k4}
  soft: {device: top, key: k5}
  plain: {device: raw}
"""


def test_status_shows_every_profile_and_inline_or_fallback(
    start_server: StartServer, tmp_path: Path
) -> None:
    ctl = start_ctl(start_server, tmp_path, CRYPTO_CONFIG)
    assert ctl.ok("status").splitlines() == [
        "top: 0 16384 linear",
        "disk: crypto: aes-256-xts [4096]; DUN up to 8 bytes; 2 keyslots",
        "raw: crypto: aes-256-xts [512 4096]; DUN up to 4 bytes; no keyslots (raw keys)",
        "top: crypto: aes-256-xts [4096]; DUN up to 8 bytes (passthrough)",
        "export inline: key k4 (aes-256-xts, 4096-byte data units): inline",
        "export soft: key k5 (aes-256-xts, 512-byte data units): "
        "blk-crypto fallback (software, at the export)",
    ]
    assert ctl.ok("status", "raw") == (
        "crypto: aes-256-xts [512 4096]; DUN up to 4 bytes; no keyslots (raw keys)\n"
    )
    assert ctl.ok("status", "top") == "0 16384 linear\n"  # dmsetup's status lines only
