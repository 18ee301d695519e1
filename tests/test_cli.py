"""The command line as a user meets it: check, serve, errors without tracebacks."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, StartServer, require_tool, run

CONFIG = """\
devices:
  disk0: {file: disk0.img, size: 8M}
  ram0: {memory: 4M}
exports:
  plain: {device: disk0, description: "a plain file", default: true}
  scratch: {device: ram0, readonly: true}
"""


def nbdcrypt(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdcrypt", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_version_and_help_on_every_subcommand() -> None:
    for args in ([], ["serve"], ["check"]):
        version = nbdcrypt(*args, "--version")
        assert version.returncode == 0
        assert version.stdout.startswith("nbdcrypt ")
        help_ = nbdcrypt(*args, "--help")
        assert help_.returncode == 0
        assert "usage: nbdcrypt" in help_.stdout


def test_check_prints_exports_and_writes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server: {listen: tcp://127.0.0.1:10809}\n" + CONFIG)
    out = nbdcrypt("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert f"disk0: file {tmp_path / 'disk0.img'}, 8.0 MiB (8388608 bytes)" in out.stdout
    assert "'plain': device disk0" in out.stdout
    assert "default export" in out.stdout
    assert "'scratch': device ram0, 4.0 MiB (4194304 bytes), read-only" in out.stdout
    assert not (tmp_path / "disk0.img").exists()


def test_config_error_is_one_located_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "server: {listen: tcp://127.0.0.1:1}\ndevices:\n  d: {file: x.img, size: 1000}\n"
    )
    out = nbdcrypt("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{cfg}:3: devices.d.size:" in out.stderr
    assert "512" in out.stderr


def test_backing_file_of_another_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "disk0.img").write_bytes(bytes(4096))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server: {listen: tcp://127.0.0.1:1}\n" + CONFIG)
    for command in ("check", "serve"):
        out = nbdcrypt(command, "-c", str(cfg))
        assert out.returncode == 2, out.stderr
        assert f"{cfg}:3: devices.disk0.size:" in out.stderr
        assert "4096" in out.stderr
        assert "8388608" in out.stderr
        assert "Traceback" not in out.stderr


def test_serve_creates_sparse_file_and_exits_0_on_sigterm(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(CONFIG)
    image = tmp_path / "disk0.img"
    assert image.stat().st_size == 8 * 1024 * 1024
    assert image.stat().st_blocks == 0
    listed = run([require_tool("nbdinfo"), "--list", server.uri(tcp=True)]).stdout
    assert 'export="plain"' in listed
    assert "a plain file" in listed
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped" in server.log
    assert not server.socket_path.exists()


def test_serve_reports_a_busy_port(tmp_path: Path, start_server: StartServer) -> None:
    first = start_server(CONFIG)
    cfg = tmp_path / "second.yaml"
    cfg.write_text(CONFIG.replace("disk0.img", "other.img"))
    out = nbdcrypt("serve", "-c", str(cfg), "--listen", f"tcp://127.0.0.1:{first.port}")
    assert out.returncode == 1
    assert "cannot listen" in out.stderr
    assert "Traceback" not in out.stderr
