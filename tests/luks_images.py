"""LUKS images for the tests, made by the real tools, and independent oracles to check them.

Images come from `cryptsetup luksFormat` (on plain files; fixed KDF costs keep it fast) and
`qemu-img create -f luks`. The oracles do not use nbdcrypt's code: `cryptsetup luksDump
--dump-volume-key` gives the volume key, `cryptography`'s XTS per sector gives the ciphertext
a LUKS payload must hold, and `rewrite_luks2` edits a LUKS2 header's JSON and rewrites both
copies with fresh checksums (for headers cryptsetup cannot make here: reencryption,
integrity, tokens only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import require_tool, run
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PASSPHRASE = b"correct horse battery staple\n"  # the newline is part of it, as with --key-file


def write_secret(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def luks_format(
    image: Path,
    passfile: Path,
    *,
    version: int = 2,
    pbkdf: str = "pbkdf2",
    sector_size: int = 512,
    size: str = "20M",
    extra: tuple[str, ...] = (),
) -> Path:
    """`cryptsetup luksFormat` on a new sparse file, with a cheap fixed KDF cost."""
    run(["truncate", "-s", size, str(image)])
    cost = ["--pbkdf-force-iterations", "1000"]
    if pbkdf != "pbkdf2":
        cost = ["--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "2"]
    args = [
        require_tool("cryptsetup"), "luksFormat", "--batch-mode", f"--type=luks{version}",
        "--key-file", str(passfile), *cost, *extra,
    ]  # fmt: skip
    if version == 2:
        args += ["--pbkdf", pbkdf, "--sector-size", str(sector_size)]
    run([*args, str(image)])
    return image


def add_keyslot(image: Path, passfile: Path, new_passfile: Path, *extra: str) -> None:
    """A PBKDF2 keyslot (without --pbkdf, LUKS2 would take 1000 as Argon2's time at 1 GiB)."""
    run([
        require_tool("cryptsetup"), "luksAddKey", "--batch-mode", "--key-file", str(passfile),
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", *extra,
        str(image), str(new_passfile),
    ])  # fmt: skip


def qemu_luks_create(image: Path, passfile: Path, size: str = "8M") -> Path:
    """A LUKS1 image made by qemu-img (aes-xts-plain64, sha256, 512-byte sectors).

    qemu calibrates PBKDF2 by the thread's CPU time; a first round that the kernel accounts as
    0 ms (tick-granular accounting, a fast SHA-256) fails with "Unable to get accurate CPU
    usage". That is qemu's calibration, not the image: try again, a few times."""
    argv = [
        require_tool("qemu-img"), "create", "-f", "luks",
        "--object", f"secret,id=s0,file={passfile}",
        "-o", "key-secret=s0,iter-time=10", str(image), size,
    ]  # fmt: skip
    for _ in range(5):
        proc = run(argv, check=False)
        if proc.returncode == 0 or "Unable to get accurate CPU usage" not in proc.stderr:
            break
    assert proc.returncode == 0, f"{argv!r} exited {proc.returncode}:\n{proc.stderr}"
    return image


def qemu_image_opts(image: Path, passfile: Path) -> list[str]:
    """The arguments that make qemu-img/qemu-io read and write a LUKS image's plaintext."""
    return [
        "--object", f"secret,id=s0,file={passfile}",
        "--image-opts", f"driver=luks,key-secret=s0,file.filename={image}",
    ]  # fmt: skip


def luks_dump(image: Path) -> str:
    return run([require_tool("cryptsetup"), "luksDump", str(image)]).stdout


def volume_key(image: Path, passfile: Path) -> bytes:
    """The volume key, as cryptsetup prints it (the test oracle)."""
    out = run([
        require_tool("cryptsetup"), "luksDump", "--dump-volume-key", "--batch-mode",
        "--key-file", str(passfile), str(image),
    ]).stdout  # fmt: skip
    match = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s+)+)", out)
    assert match, out
    return bytes.fromhex("".join(match[1].split()))


def xts(key: bytes, data: bytes, first_iv: int, sector: int, step: int, *, encrypt: bool) -> bytes:
    """dm-crypt's aes-xts-plain64 sector by sector with cryptography (IV = first + i * step)."""
    out = bytearray()
    for i in range(0, len(data), sector):
        iv = (first_iv + (i // sector) * step).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(iv))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[i : i + sector]) + ctx.finalize()
    return bytes(out)


# --- editing LUKS2 metadata ------------------------------------------------------------------

_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")


def _write_copy(fd: int, offset: int, hdr_size: int, text: bytes) -> None:
    binary = bytearray(os.pread(fd, 4096, offset))
    area = text + bytes(hdr_size - 4096 - len(text))
    binary[448:512] = bytes(64)
    alg = bytes(binary[72:104]).split(b"\0", 1)[0].decode()
    digest = hashlib.new(alg, bytes(binary) + area).digest()
    binary[448 : 448 + len(digest)] = digest
    os.pwrite(fd, bytes(binary) + area, offset)


def rewrite_luks2(image: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Apply `mutate` to the JSON metadata and write both header copies with valid checksums."""
    fd = os.open(image, os.O_RDWR)
    try:
        fields = _BINARY.unpack(os.pread(fd, _BINARY.size, 0))
        hdr_size = fields[2]
        area = os.pread(fd, hdr_size - 4096, 4096)
        doc = json.loads(area.split(b"\0", 1)[0])
        mutate(doc)
        text = json.dumps(doc, separators=(",", ":")).encode()
        for offset in (0, hdr_size):
            _write_copy(fd, offset, hdr_size, text)
    finally:
        os.close(fd)


def luks2_hdr_size(image: Path) -> int:
    with image.open("rb") as f:
        size: int = _BINARY.unpack(f.read(_BINARY.size))[2]
    return size
