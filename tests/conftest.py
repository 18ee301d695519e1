"""Shared fixtures: run a real `nbdcrypt serve` process and find the real clients."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from clients import rawnbd as rn
from tlscerts import Pki, make_pki

ROOT = Path(__file__).resolve().parent.parent


def free_tcp_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningServer:
    """A `nbdcrypt serve` child process listening on a unix socket and a loopback TCP port."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    socket_path: Path
    port: int
    log_path: Path
    stopped: bool = field(default=False)

    def uri(self, export: str = "", *, tcp: bool = False) -> str:
        """An NBD URI as libnbd and qemu take it."""
        if tcp:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server by pid and wait for it; returns its exit status."""
        if not self.stopped and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log}") from None
        self.stopped = True
        return code


def _probe(port: int) -> None:
    """Connect, end the handshake with NBD_OPT_ABORT and wait for the server to close: once
    the socket reads EOF the server has let the connection go, so a test that counts
    connections (max_connections) does not find the probe still there."""
    with rn.RawNBD.tcp(port, timeout=5) as c:
        c.start()
        c.send_option(rn.OPT_ABORT)
        c.wait_closed()


def _wait_ready(server: RunningServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log}")
        try:
            _probe(server.port)
            if server.socket_path.exists():
                return
        except (OSError, rn.ClosedError):
            pass
        time.sleep(0.05)
    server.proc.kill()
    raise AssertionError(f"server not ready within {timeout}s:\n{server.log}")


def launch_server(
    workdir: Path,
    config: str,
    *extra: str,
    name: str = "nbdcrypt",
    env: dict[str, str] | None = None,
) -> RunningServer:
    """Start `nbdcrypt serve` on CONFIG (written to workdir/NAME.yaml) and wait until it listens.

    It listens on workdir/NAME.sock and a free loopback port. The caller stops it (by pid).
    """
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(config)
    sock = workdir / f"{name}.sock"
    port = free_tcp_port()
    log = workdir / f"{name}.log"
    cmd = [
        sys.executable, "-m", "nbdcrypt", "serve", "-c", str(cfg),
        "--listen", f"unix://{sock}", "--listen", f"tcp://127.0.0.1:{port}",
        "--log-level", "debug", *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        environ = {**os.environ, **env} if env is not None else None
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=environ)
    server = RunningServer(proc, cfg, sock, port, log)
    try:
        _wait_ready(server)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return server


StartServer = Callable[..., RunningServer]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: start_server(yaml_text, *extra_args) -> RunningServer, stopped at teardown.

    The YAML is written to tmp_path/nbdcrypt.yaml (relative paths in it are relative to
    tmp_path); the listen addresses are given on the command line.
    """
    servers: list[RunningServer] = []

    def start(
        config: str, *extra: str, name: str = "nbdcrypt", env: dict[str, str] | None = None
    ) -> RunningServer:
        server = launch_server(tmp_path, config, *extra, name=name, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def require_tool(name: str) -> str:
    """The path of a real client; a missing one is an install bug, so it fails, never skips."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: run ./scripts/test, which installs it")
    return path


def run(
    cmd: list[str], *, timeout: float = 120, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a client, capture its output; on failure the assertion shows what it printed."""
    proc: subprocess.CompletedProcess[str] = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd!r} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd is installed for Debian's Python only

os.environ.setdefault("LIBNBD_DEBUG", "0")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA, a server certificate for localhost/127.0.0.1 and client certificates
    (tests/tlscerts.py), made once per session with certtool."""
    require_tool("certtool")
    return make_pki(tmp_path_factory.mktemp("pki"))
