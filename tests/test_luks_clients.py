"""LUKS devices served to real clients, byte for byte, both ways.

- qemu-img LUKS1 images (and cryptsetup LUKS1, which qemu reads too): what qemu-img writes into
  the plaintext reads back through an nbdcrypt export (nbdcopy), and what nbdcopy writes through
  nbdcrypt reads back through qemu-img.
- cryptsetup LUKS2 images (qemu 7.2 reads no LUKS2): the oracle is the volume key from
  `cryptsetup luksDump --dump-volume-key` and `cryptography`'s XTS per sector, with IVs counted
  in 512-byte sectors (0, 8, 16, ... with 4096-byte sectors), as `cryptsetup open` maps it.
- A wrong passphrase or keyslot stops the server with one line; the volume key and the
  passphrase never appear in the server's log or in `ctl table`.
- The volume key in the keyring: an export of the raw payload region with `key: <luks device>`
  reads the plaintext through the blk-crypto fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, RunningServer, StartServer, require_tool, run
from luks_images import (
    PASSPHRASE,
    luks_format,
    qemu_image_opts,
    qemu_luks_create,
    volume_key,
    write_secret,
    xts,
)

from nbdcrypt.luks.header import read_header


def nbdcopy(source: str, destination: str) -> None:
    run([require_tool("nbdcopy"), source, destination])


def qemu_write_plaintext(image: Path, passfile: Path, data: Path) -> None:
    args = [require_tool("qemu-img"), "convert", "-n", "-f", "raw", str(data)]
    args += ["--object", f"secret,id=s0,file={passfile}", "--target-image-opts"]
    args.append(f"driver=luks,key-secret=s0,file.filename={image}")
    run(args)


def qemu_read_plaintext(image: Path, passfile: Path, out: Path) -> bytes:
    run(
        [
            require_tool("qemu-img"),
            "convert",
            *qemu_image_opts(image, passfile),
            "-O",
            "raw",
            str(out),
        ]
    )
    return out.read_bytes()


def serve(
    start_server: StartServer, name: str = "vault", *extra: str, keyslot: str = ""
) -> RunningServer:
    slot = f", keyslot: {keyslot}" if keyslot else ""
    return start_server(
        f"devices:\n  {name}: {{luks: {{file: img, passphrase_file: pass{slot}}}}}\n"
        f"exports:\n  {name}: {{device: {name}}}\n",
        *extra,
    )


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    return write_secret(tmp_path / "pass", PASSPHRASE)


@pytest.mark.parametrize("maker", ["qemu-img", "cryptsetup"])
def test_luks1_both_ways_with_qemu_img(
    tmp_path: Path, passfile: Path, start_server: StartServer, maker: str
) -> None:
    image = tmp_path / "img"
    if maker == "qemu-img":
        qemu_luks_create(image, passfile, "8M")
    else:
        luks_format(image, passfile, version=1, size="10M")
    size = read_header(image).payload_size
    data = tmp_path / "data"
    data.write_bytes(os.urandom(size))
    qemu_write_plaintext(image, passfile, data)

    server = serve(start_server)
    got = tmp_path / "got"
    nbdcopy(server.uri("vault"), str(got))
    assert got.read_bytes() == data.read_bytes()

    data2 = tmp_path / "data2"
    data2.write_bytes(os.urandom(size))
    nbdcopy(str(data2), server.uri("vault", tcp=True))
    assert server.stop() == 0
    assert qemu_read_plaintext(image, passfile, tmp_path / "back") == data2.read_bytes()
    key = volume_key(image, passfile).hex()
    assert key not in server.log and key.upper() not in server.log


@pytest.mark.parametrize(
    "case",
    [(2, "argon2id", 4096), (2, "pbkdf2", 512), (2, "argon2i", 4096), (1, "pbkdf2", 512)],
    ids=str,
)
def test_cryptsetup_images_against_the_volume_key(
    tmp_path: Path, passfile: Path, start_server: StartServer, case: tuple[int, str, int]
) -> None:
    version, pbkdf, sector_size = case
    image = luks_format(
        tmp_path / "img", passfile, version=version, pbkdf=pbkdf, sector_size=sector_size
    )
    key = volume_key(image, passfile)
    header = read_header(image)
    offset, size = header.segment.offset, header.payload_size
    step = sector_size // 512  # IVs count 512-byte sectors: cryptsetup sets no iv_large_sectors

    # the oracle writes ciphertext; nbdcrypt reads the plaintext
    plain = os.urandom(size)
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(xts(key, plain, 0, sector_size, step, encrypt=True))
    server = serve(start_server)
    got = tmp_path / "got"
    nbdcopy(server.uri("vault"), str(got))
    assert got.read_bytes() == plain

    # nbdcrypt writes; the oracle decrypts what is on disk
    data = tmp_path / "data"
    data.write_bytes(os.urandom(size))
    nbdcopy(str(data), server.uri("vault"))
    assert server.stop() == 0
    stored = image.read_bytes()[offset : offset + size]
    assert stored == xts(key, data.read_bytes(), 0, sector_size, step, encrypt=True)
    assert data.read_bytes()[:4096] not in image.read_bytes()
    assert key.hex() not in server.log and PASSPHRASE.decode().strip() not in server.log
    assert f"opened with keyslot 0: aes-xts-plain64, {sector_size}-byte sectors" in server.log


def test_qemu_io_patterns_and_block_size(
    tmp_path: Path, passfile: Path, start_server: StartServer
) -> None:
    """4096-byte LUKS2 sectors: the export's minimum block size is 4096 (nbdinfo)."""
    image = luks_format(tmp_path / "img", passfile, pbkdf="argon2id", sector_size=4096)
    server = serve(start_server)
    info = run([require_tool("nbdinfo"), "--json", server.uri("vault")]).stdout
    assert '"block_size_minimum": 4096' in info
    qemu_io = [require_tool("qemu-io"), "-f", "raw", server.uri("vault")]
    out = run([*qemu_io, "-c", "write -P 0x3c 8192 64k", "-c", "read -P 0x3c 8192 64k"]).stdout
    assert "read 65536/65536 bytes at offset 8192" in out
    assert server.stop() == 0
    key = volume_key(image, passfile)
    offset = read_header(image).segment.offset
    stored = image.read_bytes()[offset + 8192 : offset + 8192 + 65536]
    assert xts(key, stored, 16, 4096, 8, encrypt=False) == b"\x3c" * 65536


def test_wrong_passphrase_or_keyslot_stops_the_server_with_one_line(
    tmp_path: Path, passfile: Path
) -> None:
    image = luks_format(tmp_path / "img", passfile)
    write_secret(tmp_path / "wrong", b"hunter2")
    cases = [
        ("passphrase_file: wrong", f"vault: no keyslot of {image} opens with the passphrase in "
         f"{tmp_path / 'wrong'}"),
    ]  # fmt: skip
    other = write_secret(tmp_path / "other", b"second")
    run([
        require_tool("cryptsetup"), "luksAddKey", "--batch-mode", "--key-file", str(passfile),
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-slot", "1",
        str(image), str(other),
    ])  # fmt: skip
    cases.append(
        (
            "passphrase_file: pass, keyslot: 1",
            f"vault: keyslot 1 of {image} does not open with the passphrase in {passfile}",
        )
    )
    for luks, message in cases:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"devices:\n  vault: {{luks: {{file: img, {luks}}}}}\n"
            "exports:\n  vault: {device: vault}\n"
        )
        proc = subprocess.run(
            [sys.executable, "-m", "nbdcrypt", "serve", "-c", str(cfg), "--listen",
             f"unix://{tmp_path / 's.sock'}"],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr == f"nbdcrypt: {message}\n"
        assert not (tmp_path / "s.sock").exists()


def test_open_passphrase_file_is_refused_at_startup(tmp_path: Path, passfile: Path) -> None:
    luks_format(tmp_path / "img", passfile, version=1)
    passfile.chmod(0o644)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "devices:\n  vault: {luks: {file: img, passphrase_file: pass}}\n"
        "exports:\n  vault: {device: vault}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "nbdcrypt", "serve", "-c", str(cfg), "--listen", "tcp://127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (
        f"nbdcrypt: config error: {cfg}:2: devices.vault.luks.passphrase_file: {passfile}: "
        "accessible by others (mode 0644); it must be private: chmod 600\n"
    )


def test_ctl_table_masks_the_volume_key(
    tmp_path: Path, passfile: Path, start_server: StartServer
) -> None:
    image = luks_format(tmp_path / "img", passfile)
    control = tmp_path / "ctl.sock"
    server = serve(start_server, "vault", "--control", str(control))
    nbdcrypt = [sys.executable, "-m", "nbdcrypt", "ctl", "--socket", str(control)]
    table = run([*nbdcrypt, "table", "vault"], cwd=ROOT).stdout
    offset = read_header(image).segment.offset // 512
    assert table.strip() == f"0 8192 crypt aes-xts-plain64 {'0' * 128} 0 vault:image {offset}"
    status = run([*nbdcrypt, "status"], cwd=ROOT).stdout
    assert "vault" in status
    assert server.stop() == 0
    key = volume_key(image, passfile).hex()
    for text in (table, status, server.log):
        assert key not in text


def test_the_volume_key_in_the_keyring(
    tmp_path: Path, passfile: Path, start_server: StartServer
) -> None:
    """`key: vault` on an export of the raw payload region decrypts it with the volume key:
    with 512-byte sectors and no IV tweak, blk-crypto's DUN is dm-crypt's plain64 IV."""
    image = luks_format(tmp_path / "img", passfile, version=1, size="6M")
    header = read_header(image)
    offset, size = header.segment.offset // 512, header.payload_size // 512
    plain = os.urandom(header.payload_size)
    key = volume_key(image, passfile)
    with image.open("r+b") as f:
        f.seek(header.segment.offset)
        f.write(xts(key, plain, 0, 512, 1, encrypt=True))
    raw = tmp_path / "raw.img"
    raw.write_bytes(image.read_bytes())  # the same bytes, as a plain file device
    server = start_server(
        "devices:\n"
        "  vault: {luks: {file: img, passphrase_file: pass}}\n"
        "  disk: {file: raw.img}\n"
        f"  payload: {{table: ['0 {size} linear disk {offset}']}}\n"
        "exports:\n"
        "  vault: {device: vault}\n"
        "  keyed: {device: payload, key: vault, readonly: true}\n"
    )
    for export in ("vault", "keyed"):
        got = tmp_path / f"{export}.out"
        nbdcopy(server.uri(export), str(got))
        assert got.read_bytes() == plain, export
    assert server.stop() == 0
