"""A running LUKS device: the image file below a one-line crypt table, as `cryptsetup open`.

`open_luks` unlocks the header with the passphrase file (unlock.py), opens the image as a file
backend and builds the mapped device whose table is the crypt line mapping.py derives from the
header. The device is a MappedDevice like any table device (`ctl table`, `status`, suspend and
resume work on it; its table text masks the key). Its volume key is also offered to the
keyring as a CryptoKey when it has a blk-crypto mode; closing the device wipes that key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nbdcrypt.backends.file import FileDevice
from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.crypto.secret import SecretBytes
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table
from nbdcrypt.luks.header import LuksHeader
from nbdcrypt.luks.mapping import crypt_line, keyring_mode
from nbdcrypt.luks.unlock import VolumeKey, unlock

log = logging.getLogger("nbdcrypt.luks")
DUN_BYTES = 8


def image_name(name: str) -> str:
    """The name of a LUKS device's image in its table (':' keeps it apart from config names)."""
    return f"{name}:image"


def keyring_key(name: str, header: LuksHeader, key: bytearray) -> CryptoKey | None:
    """The volume key as a keyring key named after the device, if it has a blk-crypto mode."""
    mode = keyring_mode(header.segment.cipher, header.key_size)
    if mode is None:
        return None
    return CryptoKey(name, mode, header.segment.sector_size, DUN_BYTES, bytearray(key))


class LuksDevice(MappedDevice):
    """The decrypted payload of a LUKS image (`/dev/mapper/NAME` after `cryptsetup open`)."""

    def __init__(self, name: str, header: LuksHeader, image: FileDevice, key: VolumeKey) -> None:
        line = crypt_line(header, SecretBytes(bytes(key.key)), image.name)
        super().__init__(name, Table.build([line], {image.name: image}))
        self.header = header
        self.image = image
        self.keyslot = key.keyslot
        self.volume_key = keyring_key(name, header, key.key)

    def close(self) -> None:
        self.image.close()
        if self.volume_key is not None:
            self.volume_key.wipe()


def open_luks(
    name: str, header: LuksHeader, passphrase_file: Path, keyslot: int | None = None
) -> LuksDevice:
    """Unlock `header` with the passphrase file and open its payload as device `name`."""
    for note in header.notes:
        log.warning("luks device %s: %s: %s", name, header.path, note)
    key = unlock(header, passphrase_file, keyslot=keyslot, label=name)
    try:
        image = FileDevice(image_name(name), header.path, header.file_size)
        try:
            device = LuksDevice(name, header, image, key)
        except BaseException:
            image.close()
            raise
    finally:
        key.wipe()
    segment = header.segment
    log.info(
        "luks device %s: %s (LUKS%d) opened with keyslot %d: %s, %d-byte sectors, payload at "
        "byte %d, %d bytes",
        name, header.path, header.version, device.keyslot, segment.cipher,
        segment.sector_size, segment.offset, device.size,
    )  # fmt: skip
    return device
