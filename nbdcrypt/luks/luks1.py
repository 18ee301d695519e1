"""The LUKS1 header (the "phdr" of the LUKS1 on-disk format specification), parsed and checked.

592 bytes at offset 0, integers big-endian: magic, version 1, cipher name and mode, hash spec,
payload offset (512-byte sectors), key bytes, master-key digest (20 bytes of PBKDF2), its salt
and iterations, UUID, then 8 keyslots of 48 bytes: active marker (0x00AC71F3 enabled,
0x0000DEAD disabled), PBKDF2 iterations, salt, key material offset (sectors), AF stripes.
One hash serves the keyslots' PBKDF2, the AF diffusion and the digest. Keyslot areas use the
data cipher with 512-byte sectors; the data uses 512-byte sectors and IVs from 0.
"""

from __future__ import annotations

import struct
from pathlib import Path

from nbdcrypt.luks import LuksError, hashes
from nbdcrypt.luks.header import SECTOR, Digest, Keyslot, LuksHeader, Pbkdf2, Segment
from nbdcrypt.luks.mapping import check_cipher

PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
KEYSLOT = struct.Struct(">II32sII")
NUM_KEYSLOTS = 8
HEADER_SIZE = PHDR.size + NUM_KEYSLOTS * KEYSLOT.size  # 592
ENABLED = 0x00AC71F3
DISABLED = 0x0000DEAD
DIGEST_SIZE = 20
MAX_STRIPES = 65536  # far above cryptsetup's 4000; bounds the material read for a keyslot


def _text(raw: bytes, path: Path, what: str) -> str:
    """A NUL-terminated ASCII field."""
    value = raw.split(b"\0", 1)[0]
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise LuksError(f"{path}: corrupt LUKS1 header: {what} is not ASCII") from None
    if not text.isprintable():
        raise LuksError(f"{path}: corrupt LUKS1 header: {what} holds control characters")
    return text


def parse(data: bytes, path: Path, file_size: int) -> LuksHeader:
    """The header in the first bytes of a file of `file_size` bytes."""
    if len(data) < HEADER_SIZE:
        raise LuksError(
            f"{path}: truncated: a LUKS1 header is {HEADER_SIZE} bytes, the file has {len(data)}"
        )
    fields = PHDR.unpack_from(data)
    name, mode, hash_spec = (
        _text(raw, path, what)
        for raw, what in zip(fields[2:5], ("cipher name", "cipher mode", "hash spec"), strict=True)
    )
    payload_offset, key_bytes = fields[5], fields[6]
    mk_digest, mk_salt, mk_iterations = fields[7], fields[8], fields[9]
    uuid = _text(fields[10], path, "UUID")
    cipher = f"{name}-{mode}"
    check_cipher(cipher, key_bytes, path)
    try:
        hashes.check_hash(hash_spec)
    except ValueError as exc:
        raise LuksError(f"{path}: {exc}") from None
    if mk_iterations < 1:
        raise LuksError(f"{path}: corrupt LUKS1 header: master key digest iterations is 0")
    keyslots = _keyslots(
        data,
        path,
        cipher=cipher,
        key_bytes=key_bytes,
        hash_spec=hash_spec,
        payload_offset=payload_offset,
    )
    offset = payload_offset * SECTOR
    _check_payload(path, offset, file_size)
    digest = Digest(0, hash_spec, mk_iterations, mk_salt, mk_digest, tuple(range(8)), (0,))
    payload = (file_size - offset) // SECTOR * SECTOR
    return LuksHeader(
        path=path,
        version=1,
        uuid=uuid,
        file_size=file_size,
        segment=Segment(0, offset, payload, 0, cipher, SECTOR),
        key_size=key_bytes,
        keyslots=keyslots,
        digest=digest,
        digests=(digest,),
        hash_spec=hash_spec,
    )


def _keyslots(
    data: bytes, path: Path, *, cipher: str, key_bytes: int, hash_spec: str, payload_offset: int
) -> tuple[Keyslot, ...]:
    active = []
    for number in range(NUM_KEYSLOTS):
        state, iterations, salt, material, stripes = KEYSLOT.unpack_from(
            data, PHDR.size + number * KEYSLOT.size
        )
        if state == DISABLED:
            continue
        if state != ENABLED:
            raise LuksError(
                f"{path}: corrupt LUKS1 header: keyslot {number} has the unknown state "
                f"0x{state:08x} (enabled is 0x{ENABLED:08x}, disabled 0x{DISABLED:08x})"
            )
        if iterations < 1 or not 1 <= stripes <= MAX_STRIPES:
            raise LuksError(
                f"{path}: corrupt LUKS1 header: keyslot {number} has {iterations} iterations "
                f"and {stripes} stripes"
            )
        slot = Keyslot(
            number=number,
            key_size=key_bytes,
            kdf=Pbkdf2(hash_spec, iterations, salt),
            stripes=stripes,
            af_hash=hash_spec,
            area_cipher=cipher,
            area_key_size=key_bytes,
            area_offset=material * SECTOR,
            area_size=-(-key_bytes * stripes // SECTOR) * SECTOR,
        )
        end = slot.area_offset + slot.area_size
        if slot.area_offset < HEADER_SIZE or end > payload_offset * SECTOR:
            raise LuksError(
                f"{path}: corrupt LUKS1 header: keyslot {number}'s key material "
                f"(bytes {slot.area_offset}..{end}) is not between the header and the payload "
                f"(at {payload_offset * SECTOR})"
            )
        active.append(slot)
    if not active:
        raise LuksError(f"{path}: no active keyslot: no passphrase can open it")
    return tuple(active)


def _check_payload(path: Path, offset: int, file_size: int) -> None:
    if offset < HEADER_SIZE:
        raise LuksError(
            f"{path}: corrupt LUKS1 header: the payload offset {offset} overlaps the header"
        )
    if file_size - offset < SECTOR:
        raise LuksError(
            f"{path}: truncated: the payload starts at byte {offset}, the file is {file_size} bytes"
        )
