"""systemd for real: the unit files pass `systemd-analyze verify` and score well in `systemd-analyze
security`; socket activation through `systemd-socket-activate` (TCP and unix, names, errors);
sd_notify READY=1 / WATCHDOG=1 / STOPPING=1 on a NOTIFY_SOCKET this test listens on.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, free_tcp_port, require_tool, run

from nbdcrypt.server import systemd

UNITS = ["nbdcrypt.service", "nbdcrypt.socket", "nbdcrypt@.service"]
CONFIG = """\
devices:
  ram: {memory: 16M}
exports:
  ram: {device: ram, default: true, description: "socket-activated"}
"""


def installed_units(tmp_path: Path) -> Path:
    """The unit files as installed with the venv's nbdcrypt instead of /usr/local/bin's."""
    nbdcrypt = Path(sys.executable).parent / "nbdcrypt"
    assert nbdcrypt.exists(), "the venv has no nbdcrypt console script"
    out = tmp_path / "units"
    out.mkdir()
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        (out / name).write_text(text.replace("/usr/local/bin/nbdcrypt", str(nbdcrypt)))
    (out / "nbdcrypt@demo.service").write_text((out / "nbdcrypt@.service").read_text())
    return out


def test_units_verify(tmp_path: Path) -> None:
    units = installed_units(tmp_path)
    names = ["nbdcrypt.service", "nbdcrypt.socket", "nbdcrypt@demo.service"]
    proc = run(
        [require_tool("systemd-analyze"), "verify", "--man=no", *names],
        cwd=units,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("unit", ["nbdcrypt.service", "nbdcrypt@demo.service"])
def test_units_security_exposure(tmp_path: Path, unit: str) -> None:
    """`systemd-analyze security` rates the hardening; docs/OPERATIONS.md reports the score."""
    units = installed_units(tmp_path)
    proc = run(
        [require_tool("systemd-analyze"), "security", "--offline=true", unit],
        cwd=units,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= 2.0, found.group(0)  # 1.2 "OK" when written


@contextmanager
def notify_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        yield path, sock


def messages_until(sock: socket.socket, wanted: str) -> list[str]:
    """Every sd_notify assignment received, up to and including `wanted`."""
    seen: list[str] = []
    while wanted not in seen:
        seen += sock.recv(4096).decode().split("\n")
    return seen


@contextmanager
def activated_server(
    tmp_path: Path, env: dict[str, str], *listen: str
) -> Iterator[subprocess.Popen[bytes]]:
    """nbdcrypt serve under systemd-socket-activate, started at once (not on demand)."""
    config = tmp_path / "activated.yaml"
    config.write_text(CONFIG)
    log = (tmp_path / "activated.log").open("wb")
    args = [require_tool("systemd-socket-activate")]
    for address in listen:
        args += ["-l", address]
    args += ["--fdname=" + ":".join(f"nbd{i}" for i in range(len(listen)))]
    args += [f"-E{name}" for name in env]
    args += [sys.executable, "-m", "nbdcrypt", "serve", "-c", str(config)]
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ | env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def test_socket_activation_and_sd_notify(tmp_path: Path) -> None:
    """The config has no server.listen: the server serves the inherited TCP and unix sockets,
    says READY=1 once they are served, pings the watchdog, and says STOPPING=1 on SIGTERM."""
    port = free_tcp_port()
    unix = tmp_path / "nbd.sock"
    with notify_socket(tmp_path) as (path, sock):
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        with activated_server(tmp_path, env, f"127.0.0.1:{port}", str(unix)) as proc:
            # systemd-socket-activate execs the server at the first connection
            info = run([require_tool("nbdinfo"), "--json", f"nbd://127.0.0.1:{port}"])
            assert '"description": "socket-activated"' in info.stdout
            seen = messages_until(sock, "READY=1")
            assert "STATUS=serving 1 export(s)" in seen
            size = run([require_tool("nbdinfo"), "--size", f"nbd+unix:///?socket={unix}"])
            assert size.stdout.strip() == str(16 * 1024 * 1024)
            assert "WATCHDOG=1" in messages_until(sock, "WATCHDOG=1")
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in messages_until(sock, "STOPPING=1")
            assert proc.wait(30) == 0
    log = (tmp_path / "activated.log").read_text()
    assert f"listening on tcp://127.0.0.1:{port} (socket activation: nbd0)" in log, log
    assert f"listening on unix://{unix} (socket activation: nbd1)" in log, log
    assert unix.exists(), "the server removed a socket that systemd owns"


def test_socket_activation_with_a_regular_file_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    junk = (tmp_path / "junk").open("w")
    code = (
        "import os, sys, runpy\n"
        f"os.dup2({junk.fileno()}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        f"sys.argv = ['nbdcrypt', 'serve', '-c', {str(config)!r}]\n"
        "runpy.run_module('nbdcrypt', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        pass_fds=(junk.fileno(),),
        check=False,
    )
    junk.close()
    assert proc.returncode == 1, proc.stderr
    assert "socket activation: fd 3 (fd3)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_activation_variables_for_another_process_are_ignored() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.activated_sockets(env) == []
    assert env == {}, "the variables must not reach child processes"


def test_notifier_without_a_socket_is_silent() -> None:
    notifier = systemd.Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_notifier_abstract_socket_and_watchdog_pid() -> None:
    name = f"nbdcrypt-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        notifier = systemd.Notifier(env)
        assert notifier.watchdog_interval is None  # WATCHDOG_PID names another process
        assert notifier.send("STATUS=x", "READY=1")
        assert sock.recv(100) == b"STATUS=x\nREADY=1"
    mine = systemd.Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == 1.5
