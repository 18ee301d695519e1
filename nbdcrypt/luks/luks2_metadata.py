"""The LUKS2 JSON metadata: keyslots, segments, digests, tokens, config, checked and converted.

What nbdcrypt serves: one data segment of type `crypt` (offset, size or "dynamic", iv_tweak,
encryption, sector_size), the pbkdf2 digest that covers it, and the keyslots of type `luks2`
that digest covers (kdf pbkdf2, argon2i or argon2id; af luks1 with its hash and stripes; area
raw with its encryption, key_size, offset and size). 64-bit numbers are decimal strings, as
the format stores them. Refused with a message naming the file: reencryption in progress,
any mandatory requirement, integrity protection, OPAL hardware segments, other segment,
keyslot or digest types, and a segment no passphrase keyslot opens (tokens only).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from nbdcrypt.luks import LuksError, hashes
from nbdcrypt.luks.header import SECTOR, Argon2, Digest, Kdf, Keyslot, LuksHeader, Pbkdf2, Segment
from nbdcrypt.luks.mapping import check_cipher, unknown_flags

if TYPE_CHECKING:
    from nbdcrypt.luks.luks2 import Copy

_T = TypeVar("_T")
SECTOR_SIZES = (512, 1024, 2048, 4096)
MAX_KEYSLOTS = 32
MAX_ARGON2_MEMORY = 4 * 1024 * 1024  # KiB, cryptsetup's limit
MAX_STRIPES = 65536
_KIND_NAMES: dict[type, str] = {str: "a string", int: "an integer"}


class _Reader:
    """Typed access to the JSON document; every problem names the file and the JSON path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> LuksError:
        return LuksError(f"{self.path}: LUKS2 metadata: {where}: {problem}")

    def obj(self, value: object, where: str) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.fail(where, "expected a JSON object")
        return value

    def get(self, obj: dict[str, object], key: str, where: str) -> object:
        if key not in obj:
            raise self.fail(where, f"missing {key!r}")
        return obj[key]

    def _typed(self, obj: dict[str, object], key: str, where: str, kind: type[_T]) -> _T:
        value = self.get(obj, key, where)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.fail(f"{where}.{key}", f"expected {_KIND_NAMES.get(kind, kind.__name__)}")
        return value

    def string(self, obj: dict[str, object], key: str, where: str) -> str:
        return self._typed(obj, key, where, str)

    def integer(self, obj: dict[str, object], key: str, where: str, minimum: int = 0) -> int:
        value = self._typed(obj, key, where, int)
        if value < minimum:
            raise self.fail(f"{where}.{key}", f"{value} is below {minimum}")
        return value

    def u64(self, obj: dict[str, object], key: str, where: str) -> int:
        """A 64-bit number, stored as a decimal string."""
        text = self.string(obj, key, where)
        if not text.isascii() or not text.isdigit() or int(text) >= 1 << 64:
            raise self.fail(f"{where}.{key}", f"expected a 64-bit number in a string, not {text!r}")
        return int(text)

    def b64(self, obj: dict[str, object], key: str, where: str) -> bytes:
        try:
            return base64.b64decode(self.string(obj, key, where), validate=True)
        except ValueError:  # binascii.Error, or characters outside ASCII
            raise self.fail(f"{where}.{key}", "not valid base64") from None

    def numbers(self, obj: dict[str, object], key: str, where: str) -> tuple[int, ...]:
        """A list of object ids ("0", "1", ...)."""
        value = self.get(obj, key, where)
        if not isinstance(value, list) or not all(
            isinstance(v, str) and v.isascii() and v.isdigit() for v in value
        ):
            raise self.fail(f"{where}.{key}", "expected a list of numbers in strings")
        return tuple(int(v) for v in value)

    def strings(self, obj: dict[str, object], key: str, where: str) -> tuple[str, ...]:
        value = obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{where}.{key}", "expected a list of strings")
        return tuple(value)

    def entries(
        self, top: dict[str, object], key: str, parse: Callable[[int, dict[str, object]], _T]
    ) -> list[_T]:
        """parse(number, object) for each entry of the section `key`, by number."""
        section = self.obj(self.get(top, key, "metadata"), key)
        found = []
        for name, value in section.items():
            if not name.isascii() or not name.isdigit():
                raise self.fail(key, f"entry {name!r} is not a number")
            found.append((int(name), value))
        return [
            parse(number, self.obj(value, f"{key}.{number}")) for number, value in sorted(found)
        ]


def build(copy: Copy, path: Path, file_size: int, notes: tuple[str, ...]) -> LuksHeader:
    """The header a valid copy describes, checked against a file of `file_size` bytes."""
    r = _Reader(path)
    top = r.obj(copy.metadata, "metadata")
    config = r.obj(r.get(top, "config", "metadata"), "config")
    _requirements(r, config)
    flags = r.strings(config, "flags", "config")
    ignored = unknown_flags(flags)
    if ignored:
        notes += (f"unknown LUKS2 flags ignored, as cryptsetup ignores them: {', '.join(ignored)}",)
    segment = _segment(r, [s for s in r.entries(top, "segments", _segment_entry) if s is not None])
    digests = tuple(r.entries(top, "digests", lambda n, o: _digest(r, n, o)))
    keyslots = tuple(r.entries(top, "keyslots", lambda n, o: _keyslot(r, n, o)))
    digest = _segment_digest(r, digests, segment)
    openers = [k for k in keyslots if k.number in digest.keyslots]
    if not openers:
        raise LuksError(
            f"{path}: no passphrase keyslot (type luks2) opens the data segment; "
            "keyslots opened only through tokens are not supported"
        )
    key_size = openers[0].key_size
    check_cipher(segment.cipher, key_size, path)
    for slot in keyslots:
        _check_area(r, slot, file_size)
    _check_segment(r, segment, file_size)
    tokens = r.entries(top, "tokens", lambda n, o: f"{n}: {o.get('type', '?')}")
    return LuksHeader(
        path=path,
        version=2,
        uuid=copy.uuid,
        file_size=file_size,
        segment=segment,
        key_size=key_size,
        keyslots=keyslots,
        digest=digest,
        digests=digests,
        label=copy.label,
        subsystem=copy.subsystem,
        seqid=copy.seqid,
        header_size=copy.hdr_size,
        keyslots_size=r.u64(config, "keyslots_size", "config"),
        checksum_alg=copy.checksum_alg,
        flags=flags,
        tokens=tuple(tokens),
        notes=notes,
    )


def _requirements(r: _Reader, config: dict[str, object]) -> None:
    requirements = r.obj(config.get("requirements", {}), "config.requirements")
    mandatory = r.strings(requirements, "mandatory", "config.requirements")
    if any(req.startswith("online-reencrypt") for req in mandatory):
        raise LuksError(
            f"{r.path}: reencryption is in progress ({', '.join(mandatory)}); finish it with "
            "cryptsetup reencrypt first"
        )
    if mandatory:
        raise LuksError(f"{r.path}: unmet mandatory LUKS2 requirements: {', '.join(mandatory)}")


def _segment_entry(number: int, obj: dict[str, object]) -> tuple[int, dict[str, object]] | None:
    """A segment that counts: not a backup kept for reencryption recovery."""
    flags = obj.get("flags", [])
    if isinstance(flags, list) and any(str(f).startswith("backup-") for f in flags):
        return None
    return number, obj


def _segment(r: _Reader, entries: list[tuple[int, dict[str, object]]]) -> Segment:
    if len(entries) != 1:
        raise LuksError(
            f"{r.path}: {len(entries)} data segments; one crypt segment is supported "
            "(several mean a reencryption in progress)"
        )
    number, obj = entries[0]
    where = f"segments.{number}"
    kind = r.string(obj, "type", where)
    if "in-reencryption" in r.strings(obj, "flags", where):
        raise LuksError(f"{r.path}: segment {number} is being reencrypted")
    if kind.startswith("hw-opal"):
        raise LuksError(f"{r.path}: segment {number} is {kind}: OPAL hardware encryption")
    if kind != "crypt":
        raise LuksError(f"{r.path}: segment {number} has type {kind!r}; only crypt is supported")
    if "integrity" in obj:
        raise LuksError(
            f"{r.path}: segment {number} has integrity protection (dm-integrity, AEAD), "
            "which is not supported"
        )
    size_text = r.string(obj, "size", where)
    size = None if size_text == "dynamic" else r.u64(obj, "size", where)
    sector_size = r.integer(obj, "sector_size", where)
    if sector_size not in SECTOR_SIZES:
        raise r.fail(f"{where}.sector_size", f"{sector_size} is not 512, 1024, 2048 or 4096")
    return Segment(
        number=number,
        offset=r.u64(obj, "offset", where),
        size=size,
        iv_tweak=r.u64(obj, "iv_tweak", where),
        cipher=r.string(obj, "encryption", where),
        sector_size=sector_size,
    )


def _digest(r: _Reader, number: int, obj: dict[str, object]) -> Digest:
    where = f"digests.{number}"
    kind = r.string(obj, "type", where)
    if kind != "pbkdf2":
        raise LuksError(f"{r.path}: digest {number} has type {kind!r}; only pbkdf2 is supported")
    digest = Digest(
        number=number,
        hash=_hash(r, r.string(obj, "hash", where), f"{where}.hash"),
        iterations=r.integer(obj, "iterations", where, 1),
        salt=r.b64(obj, "salt", where),
        value=r.b64(obj, "digest", where),
        keyslots=r.numbers(obj, "keyslots", where),
        segments=r.numbers(obj, "segments", where),
    )
    if not digest.value:
        raise r.fail(f"{where}.digest", "empty")
    return digest


def _hash(r: _Reader, name: str, where: str) -> str:
    try:
        hashes.check_hash(name)
    except ValueError as exc:
        raise LuksError(f"{r.path}: {where}: {exc}") from None
    return name


def _kdf(r: _Reader, obj: dict[str, object], where: str) -> Kdf:
    kind = r.string(obj, "type", where)
    salt = r.b64(obj, "salt", where)
    if kind == "pbkdf2":
        hash_name = _hash(r, r.string(obj, "hash", where), f"{where}.hash")
        return Pbkdf2(hash_name, r.integer(obj, "iterations", where, 1), salt)
    if kind in ("argon2i", "argon2id"):
        params = Argon2(
            kind,
            r.integer(obj, "time", where, 1),
            r.integer(obj, "memory", where, 1),
            r.integer(obj, "cpus", where, 1),
            salt,
        )
        if not 8 * params.cpus <= params.memory <= MAX_ARGON2_MEMORY:
            raise r.fail(
                f"{where}.memory",
                f"{params.memory} KiB is outside 8 KiB per cpu .. {MAX_ARGON2_MEMORY} KiB",
            )
        return params
    raise LuksError(
        f"{r.path}: {where}.type: KDF {kind!r} is not supported (pbkdf2, argon2i, argon2id)"
    )


def _keyslot(r: _Reader, number: int, obj: dict[str, object]) -> Keyslot:
    where = f"keyslots.{number}"
    kind = r.string(obj, "type", where)
    if kind == "reencrypt":
        raise LuksError(f"{r.path}: keyslot {number} is a reencryption keyslot: reencryption "
                        "is in progress")  # fmt: skip
    if kind != "luks2":
        raise LuksError(f"{r.path}: keyslot {number} has type {kind!r}; only luks2 is supported")
    if number >= MAX_KEYSLOTS:
        raise r.fail(where, f"keyslot numbers go up to {MAX_KEYSLOTS - 1}")
    af = r.obj(r.get(obj, "af", where), f"{where}.af")
    if r.string(af, "type", f"{where}.af") != "luks1":
        raise LuksError(f"{r.path}: {where}.af.type: only the luks1 AF splitter is supported")
    area = r.obj(r.get(obj, "area", where), f"{where}.area")
    if r.string(area, "type", f"{where}.area") != "raw":
        raise LuksError(f"{r.path}: {where}.area.type: only raw keyslot areas are supported")
    stripes = r.integer(af, "stripes", f"{where}.af", 1)
    if stripes > MAX_STRIPES:
        raise r.fail(f"{where}.af.stripes", f"{stripes} is more than {MAX_STRIPES}")
    priority = obj.get("priority", 1)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 2:
        raise r.fail(f"{where}.priority", "expected 0 (ignore), 1 (normal) or 2 (high)")
    slot = Keyslot(
        number=number,
        key_size=r.integer(obj, "key_size", where, 1),
        kdf=_kdf(r, r.obj(r.get(obj, "kdf", where), f"{where}.kdf"), f"{where}.kdf"),
        stripes=stripes,
        af_hash=_hash(r, r.string(af, "hash", f"{where}.af"), f"{where}.af.hash"),
        area_cipher=r.string(area, "encryption", f"{where}.area"),
        area_key_size=r.integer(area, "key_size", f"{where}.area", 1),
        area_offset=r.u64(area, "offset", f"{where}.area"),
        area_size=r.u64(area, "size", f"{where}.area"),
        priority=priority,
    )
    check_cipher(slot.area_cipher, slot.area_key_size, r.path)
    return slot


def _segment_digest(r: _Reader, digests: tuple[Digest, ...], segment: Segment) -> Digest:
    covering = [d for d in digests if segment.number in d.segments]
    if len(covering) != 1:
        raise LuksError(
            f"{r.path}: {len(covering)} digests cover segment {segment.number}; expected one"
        )
    return covering[0]


def _check_area(r: _Reader, slot: Keyslot, file_size: int) -> None:
    where = f"keyslots.{slot.number}.area"
    if slot.area_offset % SECTOR:
        raise r.fail(f"{where}.offset", f"{slot.area_offset} is not a multiple of {SECTOR}")
    if slot.material_size > slot.area_size:
        raise r.fail(
            f"{where}.size",
            f"{slot.area_size} bytes cannot hold {slot.stripes} stripes of {slot.key_size} bytes",
        )
    end = slot.area_offset + slot.material_size
    if end > file_size:
        raise LuksError(
            f"{r.path}: truncated: keyslot {slot.number}'s area needs bytes "
            f"{slot.area_offset}..{end}, the file is {file_size} bytes"
        )


def _check_segment(r: _Reader, segment: Segment, file_size: int) -> None:
    where = f"segments.{segment.number}"
    step = segment.sector_size
    if segment.offset % SECTOR:
        raise r.fail(f"{where}.offset", f"{segment.offset} is not a multiple of {SECTOR}")
    if segment.iv_tweak % (step // SECTOR):
        raise r.fail(
            f"{where}.iv_tweak", f"{segment.iv_tweak} is not a multiple of {step // SECTOR}"
        )
    end = segment.offset + (segment.size or 0)
    if segment.offset >= file_size or end > file_size:
        raise LuksError(
            f"{r.path}: truncated: the data segment needs bytes {segment.offset}.."
            f"{end if segment.size else 'the end'}, the file is {file_size} bytes"
        )
    size = segment.size if segment.size is not None else file_size - segment.offset
    if size == 0 or size % step:
        raise LuksError(
            f"{r.path}: the data segment is {size} bytes, not a positive multiple of its "
            f"{step}-byte sectors"
        )
