"""How a LUKS header maps to device-mapper: the crypt table `cryptsetup open` would load.

One line over the data segment, as cryptsetup builds it from the header:

    0 <payload sectors> crypt <cipher> <volume key> <iv_tweak> <image> <offset sectors>
      [<#opts> allow_discards ... sector_size:<N>]

LUKS never sets iv_large_sectors: with 4096-byte sectors the IV numbers still count 512-byte
sectors (0, 8, 16, ...). LUKS2 persistent flags become the optional parameters of the same
name. The volume key also joins the keyring when it has a blk-crypto mode: aes-xts-plain64
with a 512-bit key is AES-256-XTS, aes-cbc-essiv:sha256 with a 128-bit key is
AES-128-CBC-ESSIV, with the segment's sector size as data unit size and 8-byte DUNs.
"""

from __future__ import annotations

from pathlib import Path

from nbdcrypt.blkcrypto.key import CryptoMode
from nbdcrypt.crypto.secret import SecretBytes
from nbdcrypt.dm.table import TableLine
from nbdcrypt.dm.target import TargetError
from nbdcrypt.luks import LuksError
from nbdcrypt.luks.header import LuksHeader
from nbdcrypt.targets.crypt import KEY_SIZES, CipherName, CryptSpec, parse_cipher, parse_options

SECTOR = 512
# LUKS2 persistent flags -> dm-crypt optional parameters (cryptsetup's activation flags)
FLAG_OPTIONS = {
    "allow-discards": "allow_discards",
    "same-cpu-crypt": "same_cpu_crypt",
    "submit-from-crypt-cpus": "submit_from_crypt_cpus",
    "no-read-workqueue": "no_read_workqueue",
    "no-write-workqueue": "no_write_workqueue",
}
# flags that change nothing in a crypt table here (dm-integrity's journal, the kernel's queues)
INERT_FLAGS = ("no-journal", "high_priority")


def check_cipher(cipher: str, key_size: int, path: Path) -> CipherName:
    """A cipher spec the crypt target implements, with a key size it takes."""
    try:
        name = parse_cipher(cipher)
    except TargetError as exc:
        raise LuksError(f"{path}: {exc}") from None
    sizes = KEY_SIZES[name.chain]
    if key_size not in sizes:
        raise LuksError(
            f"{path}: {cipher} with a {key_size * 8}-bit key is not supported "
            f"({' or '.join(str(s * 8) for s in sizes)} bits)"
        )
    return name


def unknown_flags(flags: tuple[str, ...]) -> list[str]:
    """Flags cryptsetup does not know either: it ignores them, and so does nbdcrypt."""
    return [flag for flag in flags if flag not in FLAG_OPTIONS and flag not in INERT_FLAGS]


def option_words(sector_size: int, flags: tuple[str, ...]) -> list[str]:
    """The optional parameters of the crypt line, counted: [] or ['N', word, ...]."""
    words = [FLAG_OPTIONS[f] for f in flags if f in FLAG_OPTIONS]
    if sector_size != SECTOR:
        words.append(f"sector_size:{sector_size}")
    return [str(len(words)), *words] if words else []


def crypt_spec(
    cipher: str,
    key: SecretBytes,
    *,
    iv_offset: int,
    lower: str,
    offset: int,
    length: int,
    sector_size: int = SECTOR,
    flags: tuple[str, ...] = (),
) -> CryptSpec:
    """The crypt target of a data segment (offsets in bytes; length the segment's bytes)."""
    try:
        options = parse_options(option_words(sector_size, flags), length)
        name = parse_cipher(cipher)
    except TargetError as exc:
        raise LuksError(str(exc)) from None
    return CryptSpec(cipher, name, key, iv_offset, lower, offset // SECTOR, options)


def crypt_line(header: LuksHeader, key: SecretBytes, lower: str) -> TableLine:
    """The one table line of an opened header, mapping its payload on device `lower`."""
    segment = header.segment
    length = header.payload_size
    spec = crypt_spec(
        segment.cipher,
        key,
        iv_offset=segment.iv_tweak,
        lower=lower,
        offset=segment.offset,
        length=length,
        sector_size=segment.sector_size,
        flags=header.flags,
    )
    return TableLine(0, length // SECTOR, spec)


def keyring_mode(cipher: str, key_size: int) -> CryptoMode | None:
    """The blk-crypto mode of a volume key, if it has one."""
    if cipher in ("aes-xts-plain64", "capi:xts(aes)-plain64") and key_size == 64:
        return CryptoMode.AES_256_XTS
    if cipher in ("aes-cbc-essiv:sha256", "capi:cbc(aes)-essiv:sha256") and key_size == 16:
        return CryptoMode.AES_128_CBC_ESSIV
    return None
