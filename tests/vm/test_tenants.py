"""Two tenants of one encrypted stack at once from the Linux kernel client, each with its own key.

The stack: two backing files, each behind a 2-slot inline-encryption engine, striped into a pool,
sliced into two regions, one export per region with `encryption: per-client`. The server requires
TLS; client rules give alice's certificate her region and key, bob's his. In the guest (scenario
`tenants`) nbd-client attaches both at once over TLS: ext4 on alice's, a raw pattern on bob's;
bob's certificate cannot open alice's export. The host then reads each region back through the
server with that tenant's certificate, and finds no plaintext of either in the backing files.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from conftest import StartServer, require_tool, run
from tlscerts import SUBJECTS, Pki

from vm.guest import GuestImage, boot, ensure_guest
from vm.test_kernel_client import BOOT_TIMEOUT, EXT4_FILES, PATTERN

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
REGION = 128 * MiB
ENGINE = "{keyslots: 2, modes: {aes-256-xts: [4096]}, max_dun_bytes: 8}"


def config(pki: Pki) -> str:
    sectors = REGION // 512
    return f"""\
server:
  tls: {{mode: require, certificate: {pki.server_cert}, private_key: {pki.server_key},
        ca: {pki.ca_cert}}}
keys:
  key-a: {{mode: aes-256-xts, data_unit_size: 4096, source: {{file: keys/a.key, create: true}}}}
  key-b: {{mode: aes-256-xts, data_unit_size: 4096, source: {{file: keys/b.key, create: true}}}}
devices:
  d0: {{file: d0.img, size: 128M, inline_crypto: {ENGINE}}}
  d1: {{file: d1.img, size: 128M, inline_crypto: {ENGINE}}}
  pool: {{table: ["0 {2 * sectors} striped 2 128 d0 0 d1 0"]}}
  region-a: {{table: ["0 {sectors} linear pool 0"]}}
  region-b: {{table: ["0 {sectors} linear pool {sectors}"]}}
exports:
  tenant-a: {{device: region-a, encryption: per-client}}
  tenant-b: {{device: region-b, encryption: per-client}}
clients:
  - match: {{tls_subject: "{SUBJECTS["alice"]}"}}
    exports: {{tenant-a: rw}}
    key: key-a
  - match: {{tls_subject: "{SUBJECTS["bob"]}"}}
    exports: {{tenant-b: rw}}
    key: key-b
"""


def certificate_disk(pki: Pki, path: Path) -> Path:
    """The tenants' certificates as a tar image the guest reads from /dev/vda."""
    files = {
        "ca-cert.pem": pki.ca_cert,
        "alice-cert.pem": pki.client_cert("alice"),
        "alice-key.pem": pki.client_key("alice"),
        "bob-cert.pem": pki.client_cert("bob"),
        "bob-key.pem": pki.client_key("bob"),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, source in files.items():
            tar.add(source, arcname=name)
    data = buffer.getvalue()
    path.write_bytes(data + bytes(-len(data) % (64 * 1024)))
    return path


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest()


def test_two_tenants_at_once_over_tls_with_their_own_keys(
    guest: GuestImage, start_server: StartServer, pki: Pki, tmp_path: Path
) -> None:
    server = start_server(config(pki))
    disk = certificate_disk(pki, tmp_path / "certs.tar")
    result = boot(
        {"script": "tenants", "port": str(server.port)},
        BOOT_TIMEOUT,
        image=guest,
        console_log=tmp_path / "console.log",
        extra=["-drive", f"file={disk},format=raw,if=virtio,readonly=on"],
    )
    log = server.log
    assert result.passed, f"{result.report()}\n--- server log ---\n{log[-5000:]}"
    assert "bob refused on tenant-a" in result.lines
    assert f"{SUBJECTS['bob']}) may not open 'tenant-a': no client rule grants it" in log, log
    assert f"size-a={REGION} size-b={REGION}" in result.lines
    opened = [line for line in log.splitlines() if " opened export " in line]
    assert any(SUBJECTS["alice"] in line and "'tenant-a' with key key-a" in line for line in opened)
    assert any(SUBJECTS["bob"] in line and "'tenant-b' with key key-b" in line for line in opened)

    # each region read back through the server with its tenant's certificate
    plain_a, plain_b = tmp_path / "a.img", tmp_path / "b.img"
    for who, export, out in (("alice", "tenant-a", plain_a), ("bob", "tenant-b", plain_b)):
        uri = f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={pki.clients[who]}"
        run([require_tool("nbdcopy"), uri, str(out)], timeout=300)
    assert server.stop() == 0, log[-5000:]
    assert plain_b.read_bytes()[: len(PATTERN)] == PATTERN
    run([require_tool("e2fsck"), "-fn", str(plain_a)], timeout=120)
    debugfs = require_tool("debugfs")
    for path, data in EXT4_FILES.items():
        got = run([debugfs, "-R", f"cat /{path}", str(plain_a)], timeout=60).stdout
        assert got.encode() == data, f"/{path} differs"

    # the backing files hold ciphertext only
    raw = (tmp_path / "d0.img").read_bytes() + (tmp_path / "d1.img").read_bytes()
    for probe in (PATTERN[:4096], PATTERN[-4096:], EXT4_FILES["tree/one.bin"][:4096]):
        assert probe not in raw, "plaintext in a backing file"
    assert b"hello from the nbdcrypt kernel client test" not in raw
