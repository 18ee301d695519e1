"""QEMU's block layer against nbdcrypt: qemu-img info/convert/compare and qemu-io patterns.

qemu-io verifies patterns itself (`read -P`); its exit status alone is not trusted, the output is
checked for "Pattern verification failed" too, and the backing file is read directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients.util import (
    EXPORT_SIZE,
    STANDARD_CONFIG,
    MiB,
    random_bytes,
    read_file_range,
    server_fixture,
    workdir,
)
from conftest import RunningServer, StartServer, require_tool, run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    require_tool("qemu-io")
    require_tool("qemu-img")
    with server_fixture(tmp_path_factory, STANDARD_CONFIG, "qemu") as s:
        yield s


def qemu_io(target: list[str], *commands: str, check: bool = True) -> str:
    """Run qemu-io with -c commands; with check, every command must succeed."""
    cmd = ["qemu-io", *target]
    for c in commands:
        cmd += ["-c", c]
    proc = run(cmd, timeout=60, check=False)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"{cmd!r} exited {proc.returncode}:\n{out}"
        for bad in ("Pattern verification failed", "error", "failed", "Error"):
            assert bad not in out, f"{cmd!r}:\n{out}"
    return out


def raw_uri(server: RunningServer, export: str, *, tcp: bool = False) -> list[str]:
    return ["-f", "raw", server.uri(export, tcp=tcp)]


def image_opts(server: RunningServer, export: str, *, tcp: bool = False) -> list[str]:
    if tcp:
        nbd_opts = (
            f"file.server.type=inet,file.server.host=127.0.0.1,file.server.port={server.port}"
        )
    else:
        nbd_opts = f"file.server.type=unix,file.server.path={server.socket_path}"
    return ["--image-opts", f"driver=raw,file.driver=nbd,{nbd_opts},file.export={export}"]


# ---------------------------------------------------------------- qemu-img


@pytest.mark.parametrize("export", ["plain", "ro", "mem"])
def test_qemu_img_info_virtual_size(server: RunningServer, export: str) -> None:
    out = run(["qemu-img", "info", "--output=json", server.uri(export)], timeout=60).stdout
    info = json.loads(out)
    assert info["virtual-size"] == EXPORT_SIZE
    assert info["format"] == "raw"
    text = run(["qemu-img", "info", server.uri(export, tcp=True)], timeout=60).stdout
    assert f"virtual size: 64 MiB ({EXPORT_SIZE} bytes)" in text, text


def test_qemu_img_info_unknown_export_fails(server: RunningServer) -> None:
    proc = run(["qemu-img", "info", server.uri("nope")], timeout=60, check=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr or "export" in proc.stderr.lower(), proc.stderr


def make_image(path: Path, size: int, seed: int) -> bytes:
    """A sparse raw image: data at the start, a small island, data at the end, holes between."""
    pieces = [(0, 3 * MiB), (5 * MiB, 512 * 1024), (size - 1 * MiB, 1 * MiB)]
    data = bytearray(size)
    with path.open("wb") as f:
        f.truncate(size)
        for i, (off, length) in enumerate(pieces):
            chunk = random_bytes(length, seed + i)
            data[off : off + length] = chunk
            f.seek(off)
            f.write(chunk)
    return bytes(data)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_img_convert_in_and_out(start_server: StartServer, tmp_path: Path, tcp: bool) -> None:
    require_tool("qemu-img")
    server = start_server(STANDARD_CONFIG)
    uri = server.uri("plain", tcp=tcp)
    # fill the export with junk first, so the image's zero areas must really be written as zero
    junk = tmp_path / "junk.img"
    junk.write_bytes(random_bytes(16 * MiB, 99))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(junk), uri], timeout=120)

    src = tmp_path / "src.img"
    data = make_image(src, 16 * MiB, seed=10)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri], timeout=120)
    cmp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], timeout=120)
    assert "Images are identical" in cmp.stdout, cmp.stdout

    out = tmp_path / "out.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], timeout=120)
    assert out.stat().st_size == EXPORT_SIZE
    assert read_file_range(out, 0, 16 * MiB) == data
    assert read_file_range(out, 16 * MiB, EXPORT_SIZE - 16 * MiB) == bytes(EXPORT_SIZE - 16 * MiB)

    backing = workdir(server) / "disk0.img"
    assert read_file_range(backing, 0, 16 * MiB) == data

    # a difference is found, too (compare is not vacuous)
    src.write_bytes(data[:-1] + b"\x01")
    diff = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=False)
    assert diff.returncode == 1, diff.stdout + diff.stderr


ENCRYPTED_CONFIG = """\
keys:
  disk-key: {mode: aes-256-xts, data_unit_size: 4096, source: {file: keys/disk.key, create: true}}
devices:
  disk0:
    file: disk0.img
    size: 64M
    inline_crypto: {keyslots: 2, modes: {aes-256-xts: [512, 4096]}, max_dun_bytes: 8}
exports:
  vm: {device: disk0, key: disk-key}
"""


def test_qemu_img_convert_a_disk_image_into_an_encrypted_export_and_back(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A qcow2 disk image goes into an export with a 4096-byte-unit key and comes back out as
    qcow2 identical to it; the backing file holds only ciphertext."""
    require_tool("qemu-img")
    server = start_server(ENCRYPTED_CONFIG)
    uri = server.uri("vm")
    raw = tmp_path / "src.raw"
    data = make_image(raw, 64 * MiB, seed=20)
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(src)], timeout=120)

    run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), uri], timeout=300)
    cmp = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), uri], timeout=300)
    assert "Images are identical" in cmp.stdout, cmp.stdout

    back = tmp_path / "back.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(back)], timeout=300)
    cmp = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src), str(back)])
    assert "Images are identical" in cmp.stdout, cmp.stdout

    backing = (workdir(server) / "disk0.img").read_bytes()
    assert server.stop() == 0
    for off in (0, 2 * MiB, 5 * MiB, 63 * MiB):  # make_image's data pieces
        sample = data[off : off + 4096]
        assert any(sample)
        assert sample not in backing, f"plaintext from offset {off} in the backing file"


# ---------------------------------------------------------------- qemu-io


@pytest.mark.parametrize("form", ["uri-unix", "uri-tcp", "image-opts-unix", "image-opts-tcp"])
def test_qemu_io_write_read_pattern(server: RunningServer, form: str) -> None:
    tcp = form.endswith("tcp")
    target = image_opts(server, "plain", tcp=tcp) if form.startswith("image") else None
    target = target or raw_uri(server, "plain", tcp=tcp)
    base = {"uri-unix": 0, "uri-tcp": 1, "image-opts-unix": 2, "image-opts-tcp": 3}[form] * MiB
    qemu_io(target, f"write -P 0xab {base} 1M", f"read -P 0xab {base} 1M")
    out = qemu_io(target, f"read -P 0xac {base} 1M", check=False)
    assert "Pattern verification failed" in out, out  # read -P really checks
    assert read_file_range(workdir(server) / "disk0.img", base, MiB) == b"\xab" * MiB


def test_qemu_io_discard_then_read(server: RunningServer) -> None:
    base = 8 * MiB
    target = raw_uri(server, "plain")
    qemu_io(target, f"write -P 0xab {base} 1M", f"discard {base} 1M")
    # after a trim the spec promises nothing about the contents, but the read must succeed and
    # give either the old data or zeros, never anything else
    zero = qemu_io(target, f"read -P 0 {base} 1M", check=False)
    old = qemu_io(target, f"read -P 0xab {base} 1M", check=False)
    assert ("Pattern verification failed" not in zero) or ("Pattern verification failed" not in old)
    content = read_file_range(workdir(server) / "disk0.img", base, MiB)
    assert content in (bytes(MiB), b"\xab" * MiB)


def test_qemu_io_write_zeroes(server: RunningServer) -> None:
    base = 10 * MiB
    target = raw_uri(server, "plain")
    qemu_io(
        target,
        f"write -P 0xab {base} 3M",
        f"write -z {base + MiB} 1M",
        f"read -P 0xab {base} 1M",
        f"read -P 0 {base + MiB} 1M",
        f"read -P 0xab {base + 2 * MiB} 1M",
    )
    backing = workdir(server) / "disk0.img"
    assert read_file_range(backing, base + MiB, MiB) == bytes(MiB)
    assert read_file_range(backing, base + 2 * MiB, MiB) == b"\xab" * MiB


def test_qemu_io_write_zeroes_unmap(server: RunningServer) -> None:
    base = 14 * MiB
    target = raw_uri(server, "plain")
    qemu_io(
        target,
        f"write -P 0xcd {base} 2M",
        f"write -z -u {base} 1M",
        f"read -P 0 {base} 1M",
        f"read -P 0xcd {base + MiB} 1M",
    )
    assert read_file_range(workdir(server) / "disk0.img", base, MiB) == bytes(MiB)


def test_qemu_io_aio_write_and_flush(server: RunningServer) -> None:
    base = 18 * MiB
    target = raw_uri(server, "plain", tcp=True)
    cmds = [f"aio_write -P 0x{0x30 + i:x} {base + i * 64 * 1024} 64k" for i in range(8)]
    cmds += ["aio_flush"]
    cmds += [f"read -P 0x{0x30 + i:x} {base + i * 64 * 1024} 64k" for i in range(8)]
    qemu_io(target, *cmds)
    backing = workdir(server) / "disk0.img"
    for i in range(8):
        off = base + i * 64 * 1024
        assert read_file_range(backing, off, 64 * 1024) == bytes([0x30 + i]) * 64 * 1024


def test_qemu_io_fua_write(server: RunningServer) -> None:
    base = 20 * MiB
    qemu_io(raw_uri(server, "plain"), f"write -f -P 0x5a {base} 256k", "flush")
    assert read_file_range(workdir(server) / "disk0.img", base, 256 * 1024) == b"\x5a" * 256 * 1024


def test_qemu_io_memory_export(server: RunningServer) -> None:
    target = raw_uri(server, "mem")
    qemu_io(target, "write -P 0x77 1M 1M", "write -z 1536k 64k", "flush")
    qemu_io(
        target,
        "read -P 0x77 1M 512k",
        "read -P 0 1536k 64k",
        "read -P 0x77 1600k 448k",
        "read -P 0 0 1M",
    )


def test_qemu_io_readonly_export(server: RunningServer) -> None:
    backing = workdir(server) / "disk0.img"
    base = 24 * MiB
    qemu_io(raw_uri(server, "plain"), f"write -P 0x42 {base} 64k")
    before = read_file_range(backing, base, 64 * 1024)

    out = qemu_io(raw_uri(server, "ro"), f"write -P 0x43 {base} 64k", check=False)
    assert "wrote" not in out, out
    assert "Permission denied" in out or "read-only" in out.lower() or "failed" in out, out
    assert read_file_range(backing, base, 64 * 1024) == before

    # reads through the read-only export see the same file
    qemu_io(["-r", *raw_uri(server, "ro")], f"read -P 0x42 {base} 64k")
    info = json.loads(run(["qemu-img", "info", "--output=json", server.uri("ro")]).stdout)
    assert info["virtual-size"] == EXPORT_SIZE


def test_qemu_io_past_the_end_is_refused(server: RunningServer) -> None:
    """qemu checks bounds itself; the request never reaches the server, but qemu must know the
    size exactly for that."""
    out = qemu_io(raw_uri(server, "plain"), f"read {EXPORT_SIZE - 4096} 8k", check=False)
    assert "read 8192/8192" not in out, out
    qemu_io(raw_uri(server, "plain"), f"read {EXPORT_SIZE - 4096} 4k")
