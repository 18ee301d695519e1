"""A LUKS header as nbdcrypt uses it, whatever the version: data segment, keyslots, digest.

`read_header(path)` reads the first bytes of a file or block device, detects LUKS1 or LUKS2
and hands over to luks1.py or luks2.py, which fill in these dataclasses. Everything here is
public metadata (what `cryptsetup luksDump` prints); no passphrase or key is ever part of it.
What nbdcrypt cannot serve (reencryption in progress, integrity, unknown ciphers) is refused by
the parsers with a LuksError naming the file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nbdcrypt.luks import LuksError

SECTOR = 512
MAGIC = b"LUKS\xba\xbe"
MAGIC2 = b"SKUL\xba\xbe"  # a LUKS2 header's second copy
PROBE = 4096  # bytes read to tell the version (a LUKS2 binary header is exactly this)


@dataclass(frozen=True, slots=True)
class Pbkdf2:
    """PBKDF2-HMAC parameters of a keyslot (LUKS1, LUKS2 `kdf.type: pbkdf2`)."""

    hash: str  # the LUKS hash name: sha256, sha1, ...
    iterations: int
    salt: bytes

    name = "pbkdf2"


@dataclass(frozen=True, slots=True)
class Argon2:
    """Argon2i / Argon2id parameters of a LUKS2 keyslot."""

    variant: str  # argon2i | argon2id
    time: int  # iterations (time cost)
    memory: int  # KiB
    cpus: int  # lanes (parallelism)
    salt: bytes

    @property
    def name(self) -> str:
        return self.variant


Kdf = Pbkdf2 | Argon2


@dataclass(frozen=True, slots=True)
class Keyslot:
    """An active keyslot: how a passphrase becomes the key that decrypts its area."""

    number: int
    key_size: int  # bytes of the volume key it holds
    kdf: Kdf
    stripes: int  # anti-forensic splitter stripes
    af_hash: str
    area_cipher: str  # dm-crypt cipher spec of the keyslot area, e.g. aes-xts-plain64
    area_key_size: int  # bytes of the key the KDF derives for the area
    area_offset: int  # bytes from the start of the file
    area_size: int  # bytes reserved for the area (at least the split key, in sectors)
    priority: int = 1  # LUKS2: 0 ignore (only when named), 1 normal, 2 high

    @property
    def material_size(self) -> int:
        """Bytes of split key material, rounded up to whole 512-byte sectors as stored."""
        return -(-self.key_size * self.stripes // SECTOR) * SECTOR


@dataclass(frozen=True, slots=True)
class Digest:
    """How a candidate volume key is checked: PBKDF2 of it must equal `value`."""

    number: int
    hash: str
    iterations: int
    salt: bytes
    value: bytes
    keyslots: tuple[int, ...]  # the keyslots whose key this digest checks
    segments: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Segment:
    """The encrypted data area (LUKS2: the one `crypt` segment; LUKS1: after the header)."""

    number: int
    offset: int  # bytes from the start of the file
    size: int | None  # bytes; None: "dynamic", up to the end of the file
    iv_tweak: int  # 512-byte sectors added to the IV numbers (dm-crypt's iv_offset)
    cipher: str  # dm-crypt cipher spec, e.g. aes-xts-plain64
    sector_size: int  # bytes per encryption sector


@dataclass(frozen=True, slots=True)
class LuksHeader:
    """What one LUKS header says, validated against the file it was read from."""

    path: Path
    version: int  # 1 or 2
    uuid: str
    file_size: int  # bytes of the file or block device
    segment: Segment
    key_size: int  # volume key bytes
    keyslots: tuple[Keyslot, ...]  # active keyslots, by number
    digest: Digest  # the digest of the data segment's volume key
    digests: tuple[Digest, ...] = ()  # every digest (LUKS2 may have more)
    label: str = ""
    subsystem: str = ""
    hash_spec: str = ""  # LUKS1: the one hash of the header
    seqid: int = 0  # LUKS2: the header's update counter
    header_size: int = 0  # LUKS2: bytes of one binary header + JSON area
    keyslots_size: int = 0  # LUKS2: bytes of the keyslots area
    checksum_alg: str = ""  # LUKS2: hash of the header checksum
    flags: tuple[str, ...] = ()  # LUKS2 persistent flags (allow-discards, ...)
    tokens: tuple[str, ...] = ()  # LUKS2 token types, "N: type"
    notes: tuple[str, ...] = ()  # things worth knowing (a damaged header copy)

    @property
    def payload_size(self) -> int:
        """Bytes of the data segment ("dynamic": to the end of the file)."""
        if self.segment.size is not None:
            return self.segment.size
        return self.file_size - self.segment.offset

    def keyslot(self, number: int) -> Keyslot | None:
        return next((k for k in self.keyslots if k.number == number), None)

    def openers(self) -> tuple[Keyslot, ...]:
        """Keyslots whose key the segment's digest checks, in the order cryptsetup tries them:
        high priority first, then normal; "ignore" (0) ones only when asked for by number."""
        bound = [k for k in self.keyslots if k.number in self.digest.keyslots]
        return tuple(sorted((k for k in bound if k.priority > 0), key=lambda k: -k.priority))


def file_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def open_image(path: Path) -> int:
    """A read-only descriptor of a regular file or block device; LuksError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LuksError(f"{path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise LuksError(f"{path}: not a regular file or block device")
    return fd


def pread_exact(fd: int, length: int, offset: int, path: Path, what: str) -> bytes:
    """Exactly `length` bytes at `offset`, or a LuksError saying the file is truncated."""
    data = bytearray()
    while len(data) < length:
        chunk = os.pread(fd, length - len(data), offset + len(data))
        if not chunk:
            raise LuksError(
                f"{path}: truncated: {what} needs bytes {offset}..{offset + length}, "
                f"the file ends at {offset + len(data)}"
            )
        data += chunk
    return bytes(data)


def read_header(path: Path) -> LuksHeader:
    """Read and check the LUKS header of `path`; LuksError if it is none or unsupported."""
    fd = open_image(path)
    try:
        return parse_header(fd, path)
    finally:
        os.close(fd)


def parse_header(fd: int, path: Path) -> LuksHeader:
    from nbdcrypt.luks import luks1, luks2  # noqa: PLC0415 - they build on this module

    size = file_size(fd)
    probe = os.pread(fd, PROBE, 0)
    if len(probe) >= 8 and probe[:6] == MAGIC:
        version = int.from_bytes(probe[6:8], "big")
        if version == 1:
            return luks1.parse(probe, path, size)
        if version == 2:
            return luks2.parse(fd, path, size)
        raise LuksError(f"{path}: unsupported LUKS version {version} (1 and 2 are supported)")
    if luks2.has_secondary(fd):
        return luks2.parse(fd, path, size)
    if size < len(MAGIC):
        raise LuksError(f"{path}: not a LUKS header (the file is only {size} bytes)")
    raise LuksError(f"{path}: not a LUKS header (no LUKS magic at the start)")
