"""Tenants with their own keys on one stack with 2-slot inline engines, through real clients.

Four exports of one striped device, each with its own key, stand in for per-connection key
contexts until those exist: more keys than keyslots, all at once, every byte checked.
"""

from __future__ import annotations

import concurrent.futures
import re
import sys
from pathlib import Path

from conftest import ROOT, StartServer, require_tool, run

ENGINE = "{keyslots: 2, modes: {aes-256-xts: [512, 4096]}, max_dun_bytes: 8}"
TENANTS = 4
REGION = 4 * 1024 * 1024  # each tenant's own region of the export


def config() -> str:
    keys = "".join(
        f"  t{i}: {{mode: aes-256-xts, data_unit_size: {4096 if i % 2 else 512}, "
        f"source: {{file: keys/t{i}.key, create: true}}}}\n"
        for i in range(TENANTS)
    )
    exports = "".join(f"  t{i}: {{device: pool, key: t{i}}}\n" for i in range(TENANTS))
    return (
        f"keys:\n{keys}"
        "devices:\n"
        f"  a: {{file: a.img, size: 16M, inline_crypto: {ENGINE}}}\n"
        f"  b: {{file: b.img, size: 16M, inline_crypto: {ENGINE}}}\n"
        '  pool: {table: ["0 65536 striped 2 64 a 0 b 0"]}\n'
        "exports:\n"
        f"{exports}"
        "  raw: {device: pool}\n"
    )


def qemu_io(uri: str, *commands: str) -> str:
    args = [require_tool("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    out = run(args).stdout
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def test_four_tenants_two_slots_each_reads_only_its_own(
    tmp_path: Path, start_server: StartServer
) -> None:
    control = tmp_path / "control.sock"
    server = start_server(config(), "--control", str(control))

    def tenant(i: int) -> None:
        base, byte = i * REGION, 0xA0 + i
        uri = server.uri(f"t{i}")
        for rnd in range(3):  # interleave so keys keep displacing each other in the slots
            qemu_io(uri, f"write -P {byte + 16 * rnd:#x} {base} {REGION}")
            qemu_io(uri, f"read -P {byte + 16 * rnd:#x} {base} {REGION}")
        qemu_io(uri, f"write -P {byte:#x} {base} {REGION}", "flush")

    with concurrent.futures.ThreadPoolExecutor(TENANTS) as pool:
        list(pool.map(tenant, range(TENANTS)))

    for i in range(TENANTS):
        mine = server.uri(f"t{i}")
        qemu_io(mine, f"read -P {0xA0 + i:#x} {i * REGION} {REGION}")
        other = (i + 1) % TENANTS
        # another tenant's region read with this key is noise, not their plaintext
        out = run(
            [require_tool("qemu-io"), "-f", "raw", mine, "-c",
             f"read -P {0xA0 + other:#x} {other * REGION} 4096"],
            check=False,
        ).stdout  # fmt: skip
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
    assert server.stop() == 0
