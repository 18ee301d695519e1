"""Linux dm-crypt against nbdcrypt's crypt target: same table lines, same bytes below.

The server serves one backing file raw (export `raw`) and through several crypt tables over
regions of it (exports t1..tN). The host writes a pattern through each crypt export; the guest
(tests/vm/scenarios/dm-crypt-compat.sh) attaches `raw` as /dev/nbd0, creates the same tables
with dmsetup, checks that the kernel decrypts the host's pattern, and writes a second pattern
through /dev/mapper/cryptK, which the host then reads back through its crypt export K. The
tables cover aes-xts-plain64 (512 and 4096-byte sectors, with and without iv_large_sectors),
aes-xts-plain across the 2^32 IV wrap, aes-cbc-essiv:sha256 and capi:cbc(aes)-plain64, all with
nonzero offsets and iv_offsets. One boot checks them all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from clients.rawnbd import CMD_FLUSH, CMD_WRITE, RawNBD
from conftest import StartServer

from nbdcrypt.dm.table import parse_line
from vm.guest import GuestImage, boot, ensure_guest, gen

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 600.0
RECORDS = 1024  # 512 KiB patterns
A_OFFSET = 64 * 1024  # the host's pattern, inside each crypt device
B_OFFSET = 4 * 1024 * 1024  # the guest's pattern
NBD0 = "43:0"  # how the kernel names /dev/nbd0 in `dmsetup table`


def key(name: str, size: int) -> str:
    return hashlib.sha512(f"nbdtest-dm-crypt-{name}".encode()).digest()[:size].hex()


@dataclass(frozen=True)
class Table:
    name: str
    line: str  # a dmsetup table line over the device `lower`


TABLES = [
    Table("t1", f"0 16384 crypt aes-xts-plain64 {key('t1', 64)} 12345 lower 1"),
    Table("t2", f"0 16384 crypt aes-xts-plain64 {key('t2', 64)} 16 lower 20480 1 sector_size:4096"),
    Table(
        "t3",
        f"0 16384 crypt aes-xts-plain64 {key('t3', 32)} 24 lower 40960 "
        "2 sector_size:4096 iv_large_sectors",
    ),
    Table("t4", f"0 16384 crypt aes-cbc-essiv:sha256 {key('t4', 32)} 7 lower 61440"),
    Table("t5", f"0 16384 crypt aes-xts-plain {key('t5', 64)} 4294967000 lower 81920"),
    Table(
        "t6",
        f"0 16384 crypt capi:cbc(aes)-plain64 {key('t6', 24)} 8 lower 102400 "
        "2 sector_size:4096 allow_discards",
    ),
    Table(
        "t7",
        f"0 16384 crypt aes-cbc-essiv:sha256 {key('t7', 16)} 64 lower 122880 "
        "2 iv_large_sectors sector_size:4096",
    ),
]


def config() -> str:
    devices = "".join(f'  {t.name}: {{table: ["{t.line}"]}}\n' for t in TABLES)
    exports = "".join(f"  {t.name}: {{device: {t.name}}}\n" for t in TABLES)
    return (
        "devices:\n  lower: {file: lower.img, size: 96M}\n"
        + devices
        + "exports:\n  raw: {device: lower}\n"
        + exports
    )


def guest_params(port: int) -> dict[str, str]:
    params = {
        "script": "dm-crypt-compat",
        "port": str(port),
        "export": "raw",
        "tables": str(len(TABLES)),
        "records": str(RECORDS),
        "a_off": str(A_OFFSET),
        "b_off": str(B_OFFSET),
    }
    for k, table in enumerate(TABLES, 1):
        params[f"table{k}"] = table.line.replace(" lower ", " @ ").replace(" ", ",")
    return params


def write_pattern(socket: Path, export: str, offset: int, data: bytes) -> None:
    with RawNBD.unix(socket) as nbd:
        nbd.start()
        nbd.opt_go(export)
        rep = nbd.call(CMD_WRITE, offset, len(data), data=data)
        assert rep.errno == 0, f"write to {export} failed: {rep.errno}"
        assert nbd.call(CMD_FLUSH).errno == 0
        nbd.disconnect()


def read_back(socket: Path, export: str, offset: int, length: int) -> bytes:
    with RawNBD.unix(socket) as nbd:
        nbd.start()
        nbd.opt_go(export)
        data = nbd.read(offset, length)
        nbd.disconnect()
        return data


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest()


def test_dm_crypt_compat(guest: GuestImage, start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(config())
    for k, table in enumerate(TABLES, 1):
        pattern = gen(f"hostA-{k}", RECORDS)
        write_pattern(server.socket_path, table.name, A_OFFSET, pattern)
        assert read_back(server.socket_path, table.name, A_OFFSET, len(pattern)) == pattern
    result = boot(
        guest_params(server.port), BOOT_TIMEOUT, image=guest, console_log=tmp_path / "console.log"
    )
    assert result.passed, f"{result.report()}\n--- server log ---\n{server.log[-5000:]}"

    for k, table in enumerate(TABLES, 1):
        ours = parse_line(table.line).text().replace(" lower ", f" {NBD0} ")
        assert result.value(f"table-{k}") == ours, "dmsetup table differs from our args_text"
        want = gen(f"guestB-{k}", RECORDS)
        got = read_back(server.socket_path, table.name, B_OFFSET, len(want))
        assert got == want, f"{table.name}: nbdcrypt does not decrypt what dm-crypt wrote"
    assert server.stop() == 0, server.log[-5000:]
