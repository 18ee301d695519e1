"""Four tenants on ONE export, each with its own key, over 2-slot inline engines, via qemu-io.

Client rules tell the tenants apart by the unix socket's peer credentials (each qemu-io runs
under its own uid, through setpriv), and each connection's requests carry its tenant's key: more
keys than keyslots, all at once, every byte checked, no plaintext on disk.
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, StartServer, require_tool, run

ENGINE = "{keyslots: 2, modes: {aes-256-xts: [512, 4096]}, max_dun_bytes: 8}"
TENANTS = 4
UIDS = [0, 1001, 1002, 1003]  # tenant i connects as UIDS[i]
REGION = 4 * 1024 * 1024  # each tenant's own region of the export


def config() -> str:
    keys = "".join(
        f"  t{i}: {{mode: aes-256-xts, data_unit_size: {4096 if i % 2 else 512}, "
        f"source: {{file: keys/t{i}.key, create: true}}}}\n"
        for i in range(TENANTS)
    )
    rules = "".join(
        f"  - {{match: {{unix_uid: {UIDS[i]}}}, exports: {{shared: rw}}, key: t{i}}}\n"
        for i in range(TENANTS)
    )
    return (
        f"keys:\n{keys}"
        "devices:\n"
        f"  a: {{file: a.img, size: 16M, inline_crypto: {ENGINE}}}\n"
        f"  b: {{file: b.img, size: 16M, inline_crypto: {ENGINE}}}\n"
        '  pool: {table: ["0 65536 striped 2 64 a 0 b 0"]}\n'
        "exports:\n"
        "  shared: {device: pool, encryption: per-client}\n"
        f"clients:\n{rules}"
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every uid can reach, for the socket the tenants connect to."""
    path = Path(tempfile.mkdtemp(prefix="nbdcrypt-tenants-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def qemu_io(uid: int, uri: str, *commands: str, check: bool = True) -> str:
    args = [require_tool("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    if uid:
        args = [
            require_tool("setpriv"),
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            *args,
        ]
    out = run(args, check=check).stdout
    if check:
        assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def test_four_tenants_one_export_two_slots_each_reads_only_its_own(
    tmp_path: Path, start_server: StartServer, shared_dir: Path
) -> None:
    control = tmp_path / "control.sock"
    sock = shared_dir / "nbd.sock"
    server = start_server(config(), "--control", str(control), "--listen", f"unix://{sock}")
    sock.chmod(0o666)
    uri = f"nbd+unix:///shared?socket={sock}"

    def tenant(i: int) -> None:
        base, byte = i * REGION, 0xA0 + i
        for rnd in range(3):  # interleave so keys keep displacing each other in the slots
            qemu_io(UIDS[i], uri, f"write -P {byte + 16 * rnd:#x} {base} {REGION}")
            qemu_io(UIDS[i], uri, f"read -P {byte + 16 * rnd:#x} {base} {REGION}")
        qemu_io(UIDS[i], uri, f"write -P {byte:#x} {base} {REGION}", "flush")

    with concurrent.futures.ThreadPoolExecutor(TENANTS) as pool:
        list(pool.map(tenant, range(TENANTS)))

    for i in range(TENANTS):
        qemu_io(UIDS[i], uri, f"read -P {0xA0 + i:#x} {i * REGION} {REGION}")
        other = (i + 1) % TENANTS
        # another tenant's region, read through this tenant's key, is noise, not their data
        out = qemu_io(UIDS[i], uri, f"read -P {0xA0 + other:#x} {other * REGION} 4096", check=False)
        assert "Pattern verification failed" in out, out

    backing = (tmp_path / "a.img").read_bytes() + (tmp_path / "b.img").read_bytes()
    for i in range(TENANTS):
        assert bytes([0xA0 + i]) * 512 not in backing, f"plaintext of t{i} on disk"
    info = run(
        [sys.executable, "-m", "nbdcrypt", "ctl", "-s", str(control), "info", "a"], cwd=ROOT
    ).stdout
    slots = re.search(r"Keyslots: +2: (\d+) hits, (\d+) programs, (\d+) evictions", info)
    assert slots is not None, info
    assert int(slots[2]) >= TENANTS and int(slots[3]) >= TENANTS - 2, info  # keys swapped
    assert "Fallback bytes:   0" in info
    for i in range(TENANTS):
        assert f"unix uid={UIDS[i]} pid=" in server.log and f"with key t{i} " in server.log
    assert server.stop() == 0
