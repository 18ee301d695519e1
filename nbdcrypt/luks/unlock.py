"""Passphrase to volume key: read the passphrase file, open a keyslot, check the digest.

For a keyslot: derive the area key from the passphrase (kdf.py), read the keyslot's split key
material and decrypt it with the area cipher (512-byte sectors, IV numbers from 0 at the start
of the area), merge the stripes (af.py), and accept the result only if its PBKDF2 digest
equals the header's. Without a keyslot number every keyslot that opens the data segment is
tried, high priority first, as cryptsetup does. The passphrase file is used whole, byte for
byte, as `cryptsetup --key-file` uses a key file (newlines included, at most 8 MiB).

Passphrase, derived keys, decrypted material and rejected candidates are bytearrays wiped
once used (best effort: hashlib and OpenSSL keep copies of their own for a moment).
"""

from __future__ import annotations

import hmac
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from nbdcrypt.crypto import CbcCipher, XtsCipher
from nbdcrypt.luks import LuksError, af, kdf
from nbdcrypt.luks.header import SECTOR, Keyslot, LuksHeader, open_image, pread_exact
from nbdcrypt.luks.mapping import check_cipher

MAX_PASSPHRASE = 8192 * 1024  # cryptsetup's compiled-in maximum key file size


@dataclass(eq=False, slots=True)
class VolumeKey:
    """The volume key a keyslot gave; `wipe()` when it is no longer needed."""

    keyslot: int
    key: bytearray = field(repr=False)

    def wipe(self) -> None:
        wipe(self.key)


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a buffer with zeroes."""
    view = memoryview(buf).cast("B")
    view[:] = bytes(len(view))


def read_passphrase(path: Path) -> bytearray:
    """The whole passphrase file; refused unless it is a private (0600-like) regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise LuksError(f"passphrase file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        problem = passphrase_file_problem(st)
        if problem:
            raise LuksError(f"passphrase file {path}: {problem}")
        buf = bytearray(st.st_size)
        got = os.readv(fd, [buf]) if buf else 0
        del buf[got:]
    finally:
        os.close(fd)
    if not buf:
        raise LuksError(f"passphrase file {path} is empty")
    return buf


def passphrase_file_problem(st: os.stat_result) -> str:
    """Why a passphrase file is refused (empty if it is fine)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        return f"accessible by others (mode {mode:04o}); it must be private: chmod 600"
    if st.st_size > MAX_PASSPHRASE:
        return f"{st.st_size} bytes, more than cryptsetup's maximum of {MAX_PASSPHRASE}"
    return ""


def _area_cipher(slot: Keyslot, key: bytearray, path: Path) -> XtsCipher | CbcCipher:
    name = check_cipher(slot.area_cipher, slot.area_key_size, path)
    iv_bits = 32 if name.ivmode == "plain" else 64
    if name.chain == "xts":
        return XtsCipher(bytes(key), iv_bits=iv_bits)
    return CbcCipher(bytes(key), essiv=name.ivopts, iv_bits=iv_bits)


def open_keyslot(header: LuksHeader, slot: Keyslot, passphrase: bytearray, fd: int) -> bytearray:
    """The candidate key a keyslot gives for this passphrase (right or wrong: not checked)."""
    derived = kdf.derive(slot.kdf, passphrase, slot.area_key_size)
    material = bytearray(slot.material_size)
    try:
        cipher = _area_cipher(slot, derived, header.path)
        what = f"keyslot {slot.number}'s area"
        encrypted = pread_exact(fd, slot.material_size, slot.area_offset, header.path, what)
        cipher.decrypt(encrypted, 0, SECTOR, out=material)
        del cipher
        return af.af_merge(material, slot.key_size, slot.stripes, slot.af_hash)
    finally:
        wipe(derived)
        wipe(material)


def check_digest(header: LuksHeader, candidate: bytearray) -> bool:
    digest = header.digest
    computed = kdf.pbkdf2(digest.hash, candidate, digest.salt, digest.iterations, len(digest.value))
    try:
        return hmac.compare_digest(bytes(computed), digest.value)
    finally:
        wipe(computed)


def _candidates(header: LuksHeader, keyslot: int | None) -> tuple[Keyslot, ...]:
    if keyslot is None:
        return header.openers()
    slot = header.keyslot(keyslot)
    if slot is None or slot.number not in header.digest.keyslots:
        active = ", ".join(str(k.number) for k in header.openers()) or "none"
        raise LuksError(
            f"{header.path}: keyslot {keyslot} does not open the data segment "
            f"(keyslots that do: {active})"
        )
    return (slot,)


def unlock(
    header: LuksHeader, passphrase_file: Path, *, keyslot: int | None = None, label: str = ""
) -> VolumeKey:
    """The volume key, from the first keyslot the passphrase file opens.

    `label` names the device in the error a wrong passphrase gives.
    """
    slots = _candidates(header, keyslot)
    passphrase = read_passphrase(passphrase_file)
    fd = open_image(header.path)
    try:
        for slot in slots:
            candidate = open_keyslot(header, slot, passphrase, fd)
            if check_digest(header, candidate):
                return VolumeKey(slot.number, candidate)
            wipe(candidate)
    finally:
        wipe(passphrase)
        os.close(fd)
    who = f"{label}: " if label else ""
    if keyslot is not None:
        raise LuksError(
            f"{who}keyslot {keyslot} of {header.path} does not open with the passphrase in "
            f"{passphrase_file}"
        )
    raise LuksError(
        f"{who}no keyslot of {header.path} opens with the passphrase in {passphrase_file}"
    )
