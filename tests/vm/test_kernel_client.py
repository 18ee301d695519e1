"""The Linux kernel's NBD client (nbd-client, /dev/nbd0) against nbdcrypt, in a QEMU/TCG guest.

The guest runs tests/vm/scenarios/kernel-client.sh: attach (netlink or ioctl), O_DIRECT pattern in
the last 4 MiB, ext4 on the rest with a file tree, detach, reattach, e2fsck, verify, detach. The
host then reads the backing file directly: the pattern, `e2fsck -fn`, and every file via debugfs.

NBDTEST_VM_PEER=qemu-nbd adds the same runs against qemu-nbd, to tell a harness problem from a
server problem.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import StartServer, free_tcp_port, require_tool, run

from vm.guest import GuestImage, GuestResult, boot, ensure_guest, gen

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
DISK_SIZE = 256 * MiB
BOOT_TIMEOUT = 600.0  # a run takes 15-40 s here; TCG on a loaded shared host can be far slower
CONFIG = """\
devices:
  disk0: {file: disk0.img, size: 256M}
exports:
  vmdisk: {device: disk0, description: "kernel client test"}
"""

# Mirrors of scenarios/kernel-client.sh: its pattern and make_tree.
PATTERN = gen("nbdtest-tail", 8192)  # 4 MiB, written at the end of the device
EXT4_FILES: dict[str, bytes] = {
    "hello.txt": b"hello from the nbdcrypt kernel client test\n",
    "tree/one.bin": gen("file-one", 2048),
    "tree/sub/two.bin": gen("file-two", 3073),
    **{f"tree/sub/deep/small-{i}.txt": f"small file {i}\n".encode() for i in range(1, 17)},
    "tree/empty": b"",
}

SERVERS = ["nbdcrypt"] + (["qemu-nbd"] if os.environ.get("NBDTEST_VM_PEER") == "qemu-nbd" else [])


@dataclass
class Target:
    """An export named vmdisk on 127.0.0.1:port backed by `disk`; stop() returns the exit status."""

    port: int
    disk: Path
    stop: Callable[[], int]
    log: Callable[[], str]


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest()


@contextmanager
def qemu_nbd(tmp_path: Path) -> Iterator[Target]:
    """The reference peer: qemu-nbd serving a sparse 256 MiB file, started and killed by pid."""
    disk = tmp_path / "disk0.img"
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
    port = free_tcp_port()
    log = tmp_path / "qemu-nbd.log"
    cmd = [
        require_tool("qemu-nbd"), "-f", "raw", "-x", "vmdisk", "-p", str(port), "-b", "127.0.0.1",
        "--persistent", "--shared=4", str(disk),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"qemu-nbd did not start:\n{log.read_text()}") from None
                time.sleep(0.1)

        def stop() -> int:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(30)

        yield Target(port, disk, stop, lambda: log.read_text(errors="replace"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@contextmanager
def serve(kind: str, start_server: StartServer, tmp_path: Path) -> Iterator[Target]:
    if kind == "qemu-nbd":
        with qemu_nbd(tmp_path) as target:
            yield target
        return
    server = start_server(CONFIG)
    yield Target(server.port, tmp_path / "disk0.img", server.stop, lambda: server.log)


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize("mode", ["netlink", "ioctl"])
def test_kernel_client(
    kind: str, mode: str, guest: GuestImage, start_server: StartServer, tmp_path: Path
) -> None:
    with serve(kind, start_server, tmp_path) as target:
        params = {"script": "kernel-client", "port": str(target.port), "export": "vmdisk"}
        result = boot(
            params | {"mode": mode},
            BOOT_TIMEOUT,
            image=guest,
            console_log=tmp_path / "console.log",
        )
        assert result.passed, f"{result.report()}\n--- server log ---\n{target.log()[-5000:]}"
        status = target.stop()
        assert status == 0, f"server exited {status}:\n{target.log()[-5000:]}"
    check_guest_report(result)
    check_backing_file(target.disk, result)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def check_guest_report(result: GuestResult) -> None:
    """What the guest saw: the size, and data identical to what the host expects it to write."""
    assert result.value("size-bytes") == str(DISK_SIZE)
    assert result.value("sysfs-size-sectors") == str(DISK_SIZE // 512)
    assert result.value("pattern-md5") == md5(PATTERN), "guest and host gen() disagree"
    sums = {}
    for line in result.lines:
        if line.startswith("file-md5 "):
            _, digest, path = line.split(" ", 2)
            sums[path] = digest
    assert sums == {path: md5(data) for path, data in EXT4_FILES.items()}


def check_backing_file(disk: Path, result: GuestResult) -> None:
    """The backing file itself: the pattern at its end, a clean ext4, each file's contents."""
    assert disk.stat().st_size == DISK_SIZE
    offset = int(result.value("pattern-offset") or -1)
    assert offset == DISK_SIZE - len(PATTERN)
    with disk.open("rb") as f:
        f.seek(offset)
        assert f.read(len(PATTERN)) == PATTERN, "pattern not at the end of the backing file"
    run([require_tool("e2fsck"), "-fn", str(disk)], timeout=120)
    debugfs = require_tool("debugfs")
    for path, data in EXT4_FILES.items():
        proc = subprocess.run(
            [debugfs, "-R", f"cat /{path}", str(disk)], capture_output=True, timeout=60, check=True
        )
        assert proc.stdout == data, f"/{path} in the backing file differs from what the guest wrote"


ENCRYPTED_CONFIG = """\
keys:
  tenant: {mode: aes-256-xts, data_unit_size: 4096, source: {file: keys/tenant.key, create: true}}
devices:
  disk0:
    file: disk0.img
    size: 256M
    inline_crypto: {keyslots: 2, modes: {aes-256-xts: [4096]}, max_dun_bytes: 8}
exports:
  vmdisk: {device: disk0, key: tenant, description: "kernel client over an inline engine"}
"""


def test_kernel_client_on_an_encrypted_export(
    guest: GuestImage, start_server: StartServer, tmp_path: Path
) -> None:
    """ext4 from the kernel client on an export with a key (4096-byte data units, so
    nbd-client -b 4096): the guest's data comes back decrypted, the backing file is ciphertext."""
    server = start_server(ENCRYPTED_CONFIG)
    params = {"script": "kernel-client", "port": str(server.port), "export": "vmdisk"}
    result = boot(
        params | {"mode": "netlink", "blocksize": "4096"},
        BOOT_TIMEOUT,
        image=guest,
        console_log=tmp_path / "console.log",
    )
    assert result.passed, f"{result.report()}\n--- server log ---\n{server.log[-5000:]}"
    check_guest_report(result)
    plain = tmp_path / "plain.img"  # what the export serves: the guest's plaintext
    run([require_tool("nbdcopy"), server.uri("vmdisk"), str(plain)], timeout=300)
    assert server.stop() == 0
    check_backing_file(plain, result)
    raw = (tmp_path / "disk0.img").read_bytes()
    assert PATTERN[:4096] not in raw, "plaintext of the pattern in the backing file"
    assert EXT4_FILES["hello.txt"] not in raw, "plaintext of a file in the backing file"


def test_kernel_client_multi_conn(
    guest: GuestImage, start_server: StartServer, tmp_path: Path
) -> None:
    """`nbd-client -C 4` against an export that advertises CAN_MULTI_CONN: the kernel spreads
    its requests over four connections, and the ext4 tree and pattern survive as with one."""
    server = start_server(CONFIG)
    params = {"script": "kernel-client", "port": str(server.port), "export": "vmdisk"}
    result = boot(
        params | {"mode": "netlink", "connections": "4"},
        BOOT_TIMEOUT,
        image=guest,
        console_log=tmp_path / "console.log",
        extra=["-smp", "4"],  # blk-mq maps a CPU to a connection: one vCPU would use only one
    )
    log = server.log
    assert result.passed, f"{result.report()}\n--- server log ---\n{log[-5000:]}"
    assert server.stop() == 0, log[-5000:]
    # two attachments of four connections each, every one of them used for I/O
    opened = [line for line in log.splitlines() if "opened export 'vmdisk'" in line]
    assert len(opened) == 8, "\n".join(opened)
    closed = re.findall(r"closed export 'vmdisk'.*?: (\d+) requests", log)
    assert len(closed) == 8, log[-5000:]
    assert sum(int(n) > 0 for n in closed) >= 4, closed  # not all I/O on one connection
    check_guest_report(result)
    check_backing_file(tmp_path / "disk0.img", result)
