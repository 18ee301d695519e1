"""The keyring: loads the keys a config names, from key files, as ssh loads private keys.

A key file holds the key's raw bytes, or their hex (whitespace around it is ignored). A file
that its group or others may access is refused, as ssh refuses such private keys; so is a
file that is not a regular file. Error messages name the key and the file, never its bytes.
With `create`, a missing key file is made with random bytes and mode 0600 (for demos).
"""

from __future__ import annotations

import binascii
import os
import stat

from nbdcrypt.blkcrypto.key import CryptoKey, CryptoKeyError
from nbdcrypt.config.model import KeyConfig


class KeyFileError(Exception):
    """A key file can't be used; the message names the key and the file and says why."""


def load_key(cfg: KeyConfig) -> CryptoKey:
    size = cfg.mode.key_size
    if cfg.create and not cfg.file.exists():
        _create(cfg, size)
    raw = _read(cfg)
    text = bytes(raw).strip()
    if len(raw) != size and len(text) == 2 * size:
        try:
            raw = bytearray(binascii.unhexlify(text))
        except binascii.Error:
            raise KeyFileError(
                f"key {cfg.name}: {cfg.file} is neither {size} raw bytes nor {2 * size} hex digits"
            ) from None
    if len(raw) != size:
        raise KeyFileError(
            f"key {cfg.name}: {cfg.file} holds {len(raw)} bytes; {cfg.mode.value} needs "
            f"{size} raw bytes or {2 * size} hex digits"
        )
    try:
        return CryptoKey(cfg.name, cfg.mode, cfg.data_unit_size, cfg.dun_bytes, raw)
    except CryptoKeyError as exc:
        raise KeyFileError(str(exc)) from None


def _read(cfg: KeyConfig) -> bytearray:
    try:
        fd = os.open(cfg.file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"key {cfg.name}: {cfg.file}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key {cfg.name}: {cfg.file} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key {cfg.name}: {cfg.file} is accessible by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); it must be private: chmod 600 {cfg.file}"
            )
        if st.st_size > 4096:
            raise KeyFileError(f"key {cfg.name}: {cfg.file} is too large for a key file")
        buf = bytearray(st.st_size)
        got = os.readv(fd, [buf])
        del buf[got:]
        return buf
    finally:
        os.close(fd)


def _create(cfg: KeyConfig, size: int) -> None:
    cfg.file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(cfg.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise KeyFileError(f"key {cfg.name}: cannot create {cfg.file}: {exc.strerror}") from None
    try:
        os.write(fd, os.urandom(size))
        os.fsync(fd)
    finally:
        os.close(fd)
