"""A device fault under a mounted ext4 in the VM, injected and cleared live with `nbdcrypt ctl`.

The export's device is a table over the backing file. While the guest (scenario `fault`) has
ext4 mounted and keeps writing, the host loads a flakey table that is always down and resumes:
every I/O fails, as from a dying disk. Another client keeps using another export throughout. When
the guest has seen the errors, the host loads the linear table again. The guest then repairs
with e2fsck -fy, and e2fsck -fn must be clean with every file synced before the fault intact.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, RunningServer, StartServer, require_tool, run

from vm.guest import GuestImage, GuestResult, boot, ensure_guest
from vm.test_kernel_client import BOOT_TIMEOUT, EXT4_FILES

pytestmark = pytest.mark.vm

SECTORS = 256 * 1024 * 1024 // 512
LINEAR = f"0 {SECTORS} linear disk0 0"
BROKEN = f"0 {SECTORS} flakey disk0 0 0 3600"  # up 0 s, down an hour: every I/O fails
CONFIG = f"""\
devices:
  disk0: {{file: disk0.img, size: 256M}}
  vmdev: {{table: ["{LINEAR}"]}}
  other-ram: {{memory: 16M}}
exports:
  vmdisk: {{device: vmdev, description: "fails while the test says so"}}
  other: {{device: other-ram}}
"""
PHASE_WAIT = 400.0  # seconds for the guest to reach a phase (TCG on a loaded host is slow)


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest()


def ctl(socket: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "nbdcrypt", "ctl", "-s", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"ctl {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def swap_table(socket: Path, line: str) -> None:
    ctl(socket, "load", "vmdev", "--table", line)
    ctl(socket, "suspend", "vmdev")
    ctl(socket, "resume", "vmdev")
    assert ctl(socket, "table", "vmdev").split() == line.split()


def wait_for_phase(console: Path, phase: str, guest_run: Future[GuestResult]) -> None:
    """Wait until the guest prints `NBDTEST: phase=<phase>` (or ends, or time runs out)."""
    deadline = time.monotonic() + PHASE_WAIT
    marker = f"NBDTEST: phase={phase}"
    while time.monotonic() < deadline:
        if console.exists() and marker in console.read_text(errors="replace"):
            return
        if guest_run.done():
            raise AssertionError(f"guest ended before {marker}:\n{guest_run.result().report()}")
        time.sleep(0.2)
    raise AssertionError(f"no {marker} within {PHASE_WAIT:.0f}s")


def other_client_works(server: RunningServer, byte: int) -> None:
    """Another export on the same server: a pattern written and read back by qemu-io."""
    proc = run(
        [
            require_tool("qemu-io"), "-f", "raw", server.uri("other"),
            "-c", f"write -P {byte} 0 1M", "-c", f"read -P {byte} 0 1M",
        ],
        timeout=120,
    )  # fmt: skip
    assert "Pattern verification failed" not in proc.stdout, proc.stdout


def test_fault_under_mounted_ext4(
    guest: GuestImage, start_server: StartServer, tmp_path: Path
) -> None:
    socket = tmp_path / "control.sock"
    server = start_server(CONFIG, "--control", str(socket))
    console = tmp_path / "console.log"
    params = {"script": "fault", "port": str(server.port), "export": "vmdisk"}
    with ThreadPoolExecutor(1) as pool:
        guest_run = pool.submit(boot, params, BOOT_TIMEOUT, image=guest, console_log=console)
        try:
            wait_for_phase(console, "synced", guest_run)
            other_client_works(server, 0x11)
            swap_table(socket, BROKEN)
            other_client_works(server, 0x22)  # served while the guest's device fails
            wait_for_phase(console, "saw-io-error", guest_run)
            other_client_works(server, 0x33)
        finally:
            swap_table(socket, LINEAR)  # also on failure: let the guest finish, not hang
        result = guest_run.result()
    log = server.log
    assert result.passed, f"{result.report()}\n--- server log ---\n{log[-5000:]}"
    assert "phase=fault-cleared" in result.console
    # the guest's I/O failed at the server, with EIO from the flakey target
    assert "failed: [Errno 5] I/O error (flakey target, down interval)" in log
    # the guest checked the synced tree itself (md5sum -c); it was all of it
    checked = [line for line in result.lines if line.startswith("| ./") and line.endswith(": OK")]
    assert len(checked) == len(EXT4_FILES), result.lines
    assert server.stop() == 0, log[-5000:]
    run([require_tool("e2fsck"), "-fn", str(tmp_path / "disk0.img")], timeout=120)
