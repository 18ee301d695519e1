"""The keyring: loads the keys a config names, from their sources, and wipes them at the end.

Sources (`keys.NAME.source`):
- `file: PATH`: the key's raw bytes, or their hex (whitespace around it is ignored). A file
  that its group or others may access is refused, as ssh refuses such private keys; so is a
  file that is not a regular file. With `create`, a missing key file is made with random
  bytes and mode 0600 (for demos).
- `env: VAR`: hex in an environment variable. The variable is removed from the environment
  as it is read, so processes the server starts do not inherit it.
- `credential: NAME`: a systemd credential, the file $CREDENTIALS_DIRECTORY/NAME (raw or hex),
  checked like a key file.

Error messages name the key and the source, never its bytes. Key bytes are read into
bytearrays, and every intermediate buffer is overwritten once the key is made (best effort:
Python strings, such as an environment variable's value, cannot be wiped).
"""

from __future__ import annotations

import binascii
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from nbdcrypt.blkcrypto.key import CryptoKey, CryptoKeyError
from nbdcrypt.config.model import KeyConfig, KeyCredential, KeyEnv, KeyFile, KeyLuks

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"
MAX_KEY_FILE = 4096


class KeyFileError(Exception):
    """A key can't be loaded; the message names the key and its source and says why."""


def load_key(cfg: KeyConfig) -> CryptoKey:
    """The key `cfg` describes, read from its source."""
    source = cfg.source
    if isinstance(source, KeyLuks):  # made when its device opens (nbdcrypt/luks/device.py)
        raise KeyFileError(f"key {cfg.name}: comes from opening luks device {source.device}")
    if isinstance(source, KeyEnv):
        raw, hex_only = _from_env(cfg.name, source), True
    elif isinstance(source, KeyCredential):
        raw, hex_only = _read(cfg.name, _credential_path(cfg.name, source)), False
    else:
        if source.create and not source.path.exists():
            _create(cfg.name, source, cfg.mode.key_size)
        raw, hex_only = _read(cfg.name, source.path), False
    try:
        key = _decode(cfg, raw, hex_only)
    finally:
        _wipe(raw)
    try:
        return CryptoKey(cfg.name, cfg.mode, cfg.data_unit_size, cfg.dun_bytes, key)
    except CryptoKeyError as exc:
        _wipe(key)
        raise KeyFileError(str(exc)) from None


def wipe_keys(keys: Iterable[CryptoKey]) -> None:
    """Overwrite the bytes of every key (at shutdown: the keys are removed)."""
    for key in keys:
        key.wipe()


def _decode(cfg: KeyConfig, raw: bytearray, hex_only: bool) -> bytearray:
    """Raw bytes of the key's size, or twice as many hex digits (surrounding space ignored)."""
    size = cfg.mode.key_size
    where = f"key {cfg.name}: {cfg.source.describe()}"
    if len(raw) == size and not hex_only:
        return bytearray(raw)
    text = bytearray(raw.strip())
    try:
        if len(text) == 2 * size:
            try:
                return bytearray(binascii.unhexlify(text))
            except binascii.Error:
                pass
        if hex_only:
            raise KeyFileError(f"{where} does not hold {2 * size} hex digits ({cfg.mode.value})")
        if len(text) == 2 * size:
            raise KeyFileError(f"{where} is neither {size} raw bytes nor {2 * size} hex digits")
        raise KeyFileError(
            f"{where} holds {len(raw)} bytes; {cfg.mode.value} needs {size} raw bytes or "
            f"{2 * size} hex digits"
        )
    finally:
        _wipe(text)


def _from_env(name: str, source: KeyEnv) -> bytearray:
    """The variable's value, which is removed from the environment (even if it is bad)."""
    value = os.environ.pop(source.variable, None)
    if value is None:
        raise KeyFileError(f"key {name}: {source.describe()} is not set")
    try:
        return bytearray(value.encode("ascii"))
    except UnicodeEncodeError:
        raise KeyFileError(f"key {name}: {source.describe()} is not hex digits") from None


def _credential_path(name: str, source: KeyCredential) -> Path:
    directory = os.environ.get(CREDENTIALS_DIRECTORY)
    if not directory:
        raise KeyFileError(
            f"key {name}: {source.describe()}: ${CREDENTIALS_DIRECTORY} is not set (systemd "
            f"sets it for a unit with LoadCredential={source.name}:PATH)"
        )
    path = Path(directory) / source.name
    if not path.exists():
        raise KeyFileError(
            f"key {name}: {source.describe()}: no credential {source.name!r} in {directory} "
            f"(is LoadCredential={source.name}:... in the unit?)"
        )
    return path


def _read(name: str, path: Path) -> bytearray:
    """A private regular file's bytes (at most MAX_KEY_FILE)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"key {name}: {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key {name}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key {name}: {path} is accessible by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); it must be private: chmod 600 {path}"
            )
        if st.st_size > MAX_KEY_FILE:
            raise KeyFileError(f"key {name}: {path} is too large for a key file")
        buf = bytearray(st.st_size)
        got = os.readv(fd, [buf])
        del buf[got:]
        return buf
    finally:
        os.close(fd)


def _create(name: str, source: KeyFile, size: int) -> None:
    source.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(source.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise KeyFileError(f"key {name}: cannot create {source.path}: {exc.strerror}") from None
    try:
        os.write(fd, os.urandom(size))
        os.fsync(fd)
    finally:
        os.close(fd)


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))
