"""An nbdcrypt export as a QEMU VM's own disk: QEMU's NBD client, virtio-blk, the test kernel.

The host runs qemu-system-x86_64 with `-drive` pointing at the export (nbd:// over TCP, or the
unix socket form); the guest runs tests/vm/scenarios/qemu-disk.sh on /dev/vda: a raw O_DIRECT
pattern at the end, ext4 with a file tree on the rest, a re-read from the server after dropping
its caches. After QEMU has exited the host checks what reached the export: the same checks as the
kernel-client test, and for an encrypted export that the backing file holds no plaintext.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import StartServer, require_tool, run
from tlscerts import SUBJECTS, Pki

from vm.guest import GuestImage, GuestResult, boot, ensure_guest
from vm.test_kernel_client import (
    BOOT_TIMEOUT,
    CONFIG,
    ENCRYPTED_CONFIG,
    EXT4_FILES,
    PATTERN,
    check_backing_file,
    check_guest_report,
)

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest()


def boot_on_disk(
    guest: GuestImage, tmp_path: Path, drive: list[str], server_log: str = ""
) -> GuestResult:
    result = boot(
        {"script": "qemu-disk"},
        BOOT_TIMEOUT,
        image=guest,
        console_log=tmp_path / "console.log",
        extra=drive,
    )
    assert result.passed, f"{result.report()}\n--- server log ---\n{server_log[-5000:]}"
    assert result.exit_code == 0, result.report()  # the guest powered off; QEMU closed the disk
    return result


def test_plain_export_as_a_vm_disk_over_tcp(
    guest: GuestImage, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(CONFIG)
    drive = ["-drive", f"file={server.uri('vmdisk', tcp=True)},format=raw,if=virtio,cache=none"]
    result = boot_on_disk(guest, tmp_path, drive, server.log)
    assert server.stop() == 0, server.log[-5000:]
    assert result.value("logical-block-size") == "512"
    check_guest_report(result)
    check_backing_file(tmp_path / "disk0.img", result)


def test_encrypted_export_as_a_vm_disk_over_a_unix_socket(
    guest: GuestImage, start_server: StartServer, tmp_path: Path
) -> None:
    """4096-byte data units: the virtio disk gets 4096-byte logical blocks, as a disk with that
    sector size would; the guest's data comes back through the key, the backing file is
    ciphertext."""
    server = start_server(ENCRYPTED_CONFIG)
    drive = [
        "-drive", f"file={server.uri('vmdisk')},format=raw,if=none,id=d0,cache=none",
        "-device", "virtio-blk-pci,drive=d0,logical_block_size=4096,physical_block_size=4096",
    ]  # fmt: skip
    result = boot_on_disk(guest, tmp_path, drive, server.log)
    assert result.value("logical-block-size") == "4096"
    check_guest_report(result)
    plain = tmp_path / "plain.img"  # what the export serves: the guest's plaintext
    run([require_tool("nbdcopy"), server.uri("vmdisk"), str(plain)], timeout=300)
    assert server.stop() == 0, server.log[-5000:]
    check_backing_file(plain, result)
    raw = (tmp_path / "disk0.img").read_bytes()
    assert PATTERN[:4096] not in raw, "plaintext of the pattern in the backing file"
    assert EXT4_FILES["hello.txt"] not in raw, "plaintext of a file in the backing file"


def test_export_as_a_vm_disk_over_tls(
    guest: GuestImage, start_server: StartServer, pki: Pki, tmp_path: Path
) -> None:
    """QEMU's NBD client with `--object tls-creds-x509` against a server that requires TLS and
    a client certificate; the export has a key, so this is TLS on the wire and XTS on disk."""
    tls = (
        f"server:\n  tls: {{mode: require, certificate: {pki.server_cert}, "
        f"private_key: {pki.server_key}, ca: {pki.ca_cert}}}\n"
    )
    server = start_server(tls + ENCRYPTED_CONFIG)
    drive = [
        "-object", f"tls-creds-x509,id=tls0,dir={pki.clients['alice']},endpoint=client",
        "-blockdev",
        "driver=nbd,node-name=disk0,cache.direct=on,server.type=inet,server.host=127.0.0.1,"
        f"server.port={server.port},export=vmdisk,tls-creds=tls0",
        "-device", "virtio-blk-pci,drive=disk0,logical_block_size=4096,physical_block_size=4096",
    ]  # fmt: skip
    result = boot_on_disk(guest, tmp_path, drive, server.log)
    log = server.log
    assert "TLSv1.3 established: 127.0.0.1" in log, log[-3000:]
    assert SUBJECTS["alice"] in log
    check_guest_report(result)
    plain = tmp_path / "plain.img"
    uri = f"nbds://127.0.0.1:{server.port}/vmdisk?tls-certificates={pki.clients['alice']}"
    run([require_tool("nbdcopy"), uri, str(plain)], timeout=300)
    assert server.stop() == 0, log[-5000:]
    check_backing_file(plain, result)
    raw = (tmp_path / "disk0.img").read_bytes()
    assert PATTERN[:4096] not in raw, "plaintext of the pattern in the backing file"
