"""Boot the test VM: a QEMU/TCG guest that runs the Linux kernel's NBD client against a server.

The host kernel has no NBD client, so tests that need /dev/nbdX boot a throw-away guest (see
docs/TESTING-VM.md). `ensure_guest()` builds its kernel and initramfs with tests/vm/build-guest
(cached in .cache/vm), `boot(params, timeout)` runs one scenario in it and returns what the guest
printed on its serial console: one result marker (`NBDTEST-RESULT: PASS` or `... FAIL <reason>`)
and log lines prefixed `NBDTEST: `. Parameters reach the guest's /init as `nbdtest.KEY=VALUE` on
the kernel command line; inside the guest the host is 10.0.2.2, which QEMU maps to 127.0.0.1, so a
server under test listens on loopback.

No qemu process outlives `boot()`: it is waited for with a timeout and killed by pid otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD_GUEST = HERE / "build-guest"
CACHE = Path(os.environ.get("NBDTEST_VM_CACHE", ROOT / ".cache" / "vm"))

BUILD_TIMEOUT = 1800.0  # the first build downloads about 70 MB
KILL_WAIT = 30.0
RECORD = 512  # gen() record size

_PARAM_KEY = re.compile(r"[a-z0-9_]+")
_PARAM_VALUE = re.compile(r"[^\s\"'\\]*")
_RESULT = re.compile(r"NBDTEST-RESULT: (PASS|FAIL)(?: (.*))?")
_LOG = re.compile(r"NBDTEST: (.*)")


@dataclass(frozen=True)
class GuestImage:
    """The guest's kernel and initramfs, as build-guest leaves them."""

    kernel: Path
    initrd: Path
    kernel_version: str


@dataclass(frozen=True)
class GuestResult:
    """What one boot printed: the result marker, the NBDTEST: lines, the whole console."""

    passed: bool
    reason: str  # empty when passed
    lines: list[str]  # the NBDTEST: log lines, without the prefix
    console: str
    console_log: Path
    exit_code: int | None  # qemu's; None when it was killed on timeout
    timed_out: bool

    def value(self, key: str) -> str | None:
        """The value of the last `NBDTEST: key=value` line, or None."""
        found = None
        for line in self.lines:
            name, sep, value = line.partition("=")
            if sep and name == key:
                found = value
        return found

    def report(self, tail: int = 80) -> str:
        """For an assertion message: the verdict and the end of the console log."""
        last = "\n".join(self.console.splitlines()[-tail:])
        verdict = "PASS" if self.passed else f"FAIL {self.reason}"
        return (
            f"guest: {verdict} (qemu exit {self.exit_code}, console log {self.console_log})\n"
            f"--- last {tail} console lines ---\n{last}"
        )


def ensure_guest() -> GuestImage:
    """Build the guest if needed: build-guest is idempotent and takes ~0.1 s when up to date."""
    proc = subprocess.run(
        [str(BUILD_GUEST)], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD_GUEST} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    kernel = CACHE / "kernel" / "vmlinuz"
    initrd = CACHE / "initrd.gz"
    version = (CACHE / "kernel" / "version").read_text().strip()
    return GuestImage(kernel, initrd, version)


def kernel_command_line(params: dict[str, str]) -> str:
    """`console=ttyS0 quiet panic=-1` plus nbdtest.KEY=VALUE for each parameter."""
    words = ["console=ttyS0", "quiet", "panic=-1"]
    for key, value in params.items():
        if not _PARAM_KEY.fullmatch(key):
            raise ValueError(f"guest parameter name {key!r}: use [a-z0-9_]")
        if not _PARAM_VALUE.fullmatch(value):
            raise ValueError(f"guest parameter {key}={value!r}: no blanks, quotes or backslashes")
        words.append(f"nbdtest.{key}={value}")
    return " ".join(words)


def qemu_command(
    image: GuestImage, console_log: Path, append: str, extra: Sequence[str] = ()
) -> list[str]:
    """The QEMU invocation known to work here (TCG; -accel kvm hangs on this kind of host);
    `extra` adds arguments, e.g. a -drive whose disk is an NBD export."""
    return [
        "qemu-system-x86_64",
        "-accel", "tcg", "-cpu", "qemu64", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-monitor", "none",
        "-serial", f"file:{console_log}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        *extra,
    ]  # fmt: skip


def boot(
    params: dict[str, str],
    timeout: float,
    *,
    image: GuestImage | None = None,
    console_log: Path | None = None,
    extra: Sequence[str] = (),
) -> GuestResult:
    """Boot the guest once with these nbdtest.* parameters and wait at most `timeout` seconds.

    Unless the caller sets `timeout` in params, the guest's own watchdog is set to fire a little
    before the host gives up, so a stuck scenario still reports a FAIL with the guest's dmesg.
    The console log goes to `console_log` (default: a new temporary directory), qemu's own
    output next to it with the suffix .qemu. `extra` arguments go to qemu as they are.
    """
    if image is None:
        image = ensure_guest()
    if console_log is None:
        console_log = Path(tempfile.mkdtemp(prefix="nbdtest-vm-")) / "console.log"
    console_log.parent.mkdir(parents=True, exist_ok=True)
    console_log.unlink(missing_ok=True)
    params = dict(params)
    params.setdefault("timeout", str(max(10, int(timeout - max(20.0, timeout * 0.1)))))
    cmd = qemu_command(image, console_log, kernel_command_line(params), extra)

    timed_out = False
    exit_code: int | None
    qemu_out = console_log.with_suffix(".qemu")
    with qemu_out.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            exit_code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            exit_code = None
        finally:
            if proc.poll() is None:  # timeout, or an exception (KeyboardInterrupt) while waiting
                proc.kill()
                proc.wait(KILL_WAIT)
    return parse_console(console_log, exit_code, timed_out, timeout, qemu_out)


def parse_console(
    console_log: Path, exit_code: int | None, timed_out: bool, timeout: float, qemu_out: Path
) -> GuestResult:
    """Find the first result marker and the NBDTEST: lines in a console log."""
    console = ""
    if console_log.exists():
        console = console_log.read_bytes().decode(errors="replace").replace("\r", "")
    lines: list[str] = []
    verdict: tuple[bool, str] | None = None
    for line in console.splitlines():
        # search, not match: a kernel message can land on the same line as the guest's output
        if verdict is None and (m := _RESULT.search(line)):
            verdict = (m.group(1) == "PASS", (m.group(2) or "").strip())
        elif m := _LOG.search(line):
            lines.append(m.group(1))
    if verdict is None:
        qemu_said = qemu_out.read_text(errors="replace").strip() if qemu_out.exists() else ""
        if timed_out:
            why = f"timed out after {timeout:.0f}s without a result marker"
        else:
            why = f"no result marker (qemu exited {exit_code})"
        verdict = (False, f"{why}{': ' + qemu_said if qemu_said else ''}")
    passed, reason = verdict
    return GuestResult(passed, reason, lines, console, console_log, exit_code, timed_out)


def gen(tag: str, records: int) -> bytes:
    """The guest's `gen TAG RECORDS` (tests/vm/init): records of 512 bytes, record i being
    f"{tag} {i:07d} " repeated by doubling, cut to 511 bytes, then a newline."""
    out = bytearray()
    for i in range(records):
        s = f"{tag} {i:07d} "
        while len(s) < RECORD - 1:
            s += s
        out += s[: RECORD - 1].encode() + b"\n"
    return bytes(out)
