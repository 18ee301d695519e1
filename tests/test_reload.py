"""Reloading the configuration without dropping clients: SIGHUP and `nbdcrypt ctl reload`.

Real clients throughout: nbdinfo lists what new clients see, a libnbd handle stays connected
across reloads and keeps reading and writing, qemu-io checks data through changed tables.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest
from conftest import ROOT, RunningServer, StartServer, require_tool, run

from nbdcrypt.config.loader import load_config
from nbdcrypt.server.reload import ReloadError, plan

MiB = 1024 * 1024
BASE = """\
devices:
  a: {memory: 16M}
  t: {table: ["0 16384 linear a 0"]}
exports:
  one: {device: t, description: first}
  old: {device: a}
"""
GROWN = """\
devices:
  a: {memory: 16M}
  b: {memory: 8M}
  t: {table: ["0 8192 linear a 8192", "8192 8192 linear b 0"]}
exports:
  one: {device: t, description: first, readonly: true}
  two: {device: b, description: second}
"""


def ctl(control: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdcrypt", "ctl", "-s", str(control), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def exports_listed(server: RunningServer) -> list[str]:
    out = run([require_tool("nbdinfo"), "--list", "--json", server.uri()]).stdout
    return sorted(e["export-name"] for e in json.loads(out)["exports"])


def rewrite(server: RunningServer, text: str) -> None:
    server.config_path.write_text(text)


def wait_for_log(server: RunningServer, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the server log:\n{server.log[-3000:]}")


def connect(server: RunningServer, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(str(server.socket_path))
    return h


def test_sighup_adds_exports_devices_and_swaps_a_table(start_server: StartServer) -> None:
    server = start_server(BASE)
    assert exports_listed(server) == ["old", "one"]
    h = connect(server, "one")
    h.pwrite(b"\x5a" * MiB, 4 * MiB + 0)  # sector 8192 of a: where the new table's start maps
    h.pwrite(b"\xa5" * MiB, 0)

    rewrite(server, GROWN)
    server.proc.send_signal(signal.SIGHUP)
    log = wait_for_log(server, "reloaded ")
    assert "exports +two -old ~one; devices +b; tables swapped ~t" in log, log[-2000:]

    assert exports_listed(server) == ["one", "two"]
    # the connection opened before the reload goes on, through the new table
    assert h.pread(MiB, 0) == b"\x5a" * MiB
    h.pwrite(b"\x11" * 512, 4 * MiB)  # now in b: the old connection keeps its read-write view
    assert h.pread(512, 4 * MiB) == b"\x11" * 512
    h.shutdown()
    # a new client gets the new export definition: read-only
    info = run([require_tool("nbdinfo"), "--json", server.uri("one")]).stdout
    assert '"is_read_only": true' in info
    two = connect(server, "two")
    assert two.pread(512, 0) == b"\x11" * 512  # the same bytes, seen through device b
    two.shutdown()
    assert server.stop() == 0


def test_a_removed_export_keeps_its_open_connections(start_server: StartServer) -> None:
    server = start_server(BASE)
    h = connect(server, "old")
    h.pwrite(b"\x42" * 4096, 0)
    rewrite(server, BASE.replace("  old: {device: a}\n", ""))
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, "reloaded ")
    refused = run([require_tool("nbdinfo"), server.uri("old")], check=False)
    assert refused.returncode != 0, refused.stdout
    # the open connection is served on as before
    h.pwrite(b"\x43" * 4096, 4096)
    assert h.pread(8192, 0) == b"\x42" * 4096 + b"\x43" * 4096
    h.flush()
    h.shutdown()
    assert server.stop() == 0


def test_removed_devices_close_once_their_last_client_leaves(start_server: StartServer) -> None:
    config = BASE + "  gone: {device: g}\n"
    config = config.replace("devices:\n", "devices:\n  g: {memory: 1M}\n")
    server = start_server(config)
    h = connect(server, "gone")
    rewrite(server, BASE)
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, "reloaded ")
    assert "device g closed" not in server.log  # still open: a client has it
    h.pwrite(b"\x01" * 512, 0)
    h.shutdown()
    server.proc.send_signal(signal.SIGHUP)  # the next reload closes what nobody uses
    wait_for_log(server, "device g closed (removed from the config)")
    assert server.stop() == 0


@pytest.fixture
def controlled(start_server: StartServer, tmp_path: Path) -> tuple[RunningServer, Path]:
    control = tmp_path / "control.sock"
    return start_server(BASE, "--control", str(control)), control


def test_ctl_reload_reports_what_changed(controlled: tuple[RunningServer, Path]) -> None:
    server, control = controlled
    rewrite(server, GROWN)
    out = ctl(control, "reload")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"reloaded {server.config_path}: exports +two -old ~one"), out
    again = ctl(control, "reload")
    assert again.stdout.strip().endswith(": no changes"), again.stdout


BROKEN = [
    ("exports: [", "YAML syntax error"),
    (BASE.replace("linear a 0", "linear nothere 0"), "unknown device"),
    (BASE.replace("a: {memory: 16M}", "a: {memory: 32M}"), "device a: size changed"),
    (BASE.replace("a: {memory: 16M}", "a: {file: a.img, size: 16M}"), "device a: its kind changed"),
]


@pytest.mark.parametrize(("text", "why"), BROKEN, ids=[w for _, w in BROKEN])
def test_a_bad_config_is_refused_whole_and_the_old_one_stays(
    controlled: tuple[RunningServer, Path], text: str, why: str
) -> None:
    server, control = controlled
    h = connect(server, "one")
    h.pwrite(b"\x77" * 4096, 0)
    rewrite(server, text)
    out = ctl(control, "reload")
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("nbdcrypt ctl: reload refused, the running configuration stays")
    assert why in out.stderr, out.stderr
    assert "Traceback" not in server.log
    assert "ERROR nbdcrypt.server: reload refused, the running configuration stays: " in server.log
    assert exports_listed(server) == ["old", "one"]  # unchanged for new clients
    assert h.pread(4096, 0) == b"\x77" * 4096
    h.shutdown()
    server.proc.send_signal(signal.SIGHUP)  # and SIGHUP with the same file: logged, not fatal
    wait_for_log(server, "reload refused", timeout=10)
    assert server.proc.poll() is None
    assert server.stop() == 0


ENCRYPTED = """\
keys:
  k: {mode: aes-256-xts, data_unit_size: 512, source: {file: k.key, create: true}}
devices:
  inline:
    file: inline.img
    size: 8M
    inline_crypto: {keyslots: 2, modes: {aes-256-xts: [512]}, max_dun_bytes: 8}
  plain: {file: plain.img, size: 8M}
  top: {table: ["0 16384 linear inline 0"]}
exports:
  vault: {device: top, key: k}
"""


def test_a_table_that_would_lose_inline_crypto_is_refused(
    start_server: StartServer, tmp_path: Path
) -> None:
    control = tmp_path / "control.sock"
    server = start_server(ENCRYPTED, "--control", str(control))
    rewrite(server, ENCRYPTED.replace("linear inline 0", "linear plain 0"))
    out = ctl(control, "reload")
    assert out.returncode == 1
    assert "would lose inline crypto capabilities" in out.stderr, out.stderr
    assert "device plain lacks" in out.stderr, out.stderr
    table = ctl(control, "table", "top")
    assert table.stdout.split() == ["0", "16384", "linear", "inline", "0"]
    assert ctl(control, "info", "top").stdout.count("LIVE & INACTIVE") == 0  # nothing staged
    assert server.stop() == 0


def write_config(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text("server: {listen: tcp://127.0.0.1:10809}\n" + text)
    return path


def test_plan_names_the_device_level_changes(tmp_path: Path) -> None:
    old = load_config(write_config(tmp_path, "old.yaml", BASE))
    new = load_config(write_config(tmp_path, "new.yaml", GROWN))
    change = plan(old, new)
    assert (change.added, change.removed, change.retabled) == (["b"], [], ["t"])
    assert change.summary(old, new) == "exports +two -old ~one; devices +b; tables swapped ~t"
    assert plan(old, old).summary(old, old) == "no changes"


def test_plan_refuses_a_changed_backing_file(tmp_path: Path) -> None:
    text = "devices:\n  d: {file: d.img, size: 1M}\nexports:\n  e: {device: d}\n"
    old = load_config(write_config(tmp_path, "old.yaml", text))
    new = load_config(write_config(tmp_path, "new.yaml", text.replace("d.img", "e.img")))
    with pytest.raises(ReloadError, match=r"device d: path changed; a file device changes only"):
        plan(old, new)


def test_plan_refuses_a_moved_control_socket(tmp_path: Path) -> None:
    old = load_config(write_config(tmp_path, "old.yaml", BASE))
    moved = BASE.replace("devices:", "server: {control: unix:///run/x.sock}\ndevices:", 1)
    path = tmp_path / "new.yaml"
    path.write_text(moved.replace("server: {", "server: {listen: tcp://127.0.0.1:10809, ", 1))
    with pytest.raises(ReloadError, match=r"server\.control changed"):
        plan(old, load_config(path))


def test_a_key_file_others_can_read_is_refused_on_reload(
    controlled: tuple[RunningServer, Path], tmp_path: Path
) -> None:
    """KeyFileError is not an OSError: it must still be a refused reload, not a traceback."""
    server, control = controlled
    key = tmp_path / "open.key"
    key.write_bytes(bytes(range(64)))
    key.chmod(0o644)
    rewrite(
        server,
        BASE + "keys:\n  k: {mode: aes-256-xts, data_unit_size: 512, source: {file: open.key}}\n",
    )
    out = ctl(control, "reload")
    assert out.returncode == 1, out.stdout
    assert "accessible by others" in out.stderr, out.stderr
    assert "Traceback" not in server.log and "internal error" not in out.stderr
    assert exports_listed(server) == ["old", "one"]
    assert server.stop() == 0
