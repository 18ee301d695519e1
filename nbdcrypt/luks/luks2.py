"""The LUKS2 header's two copies: binary headers, JSON areas, checksums, which copy wins.

Each copy is a 4096-byte binary header (integers big-endian: magic `LUKS\\xba\\xbe`, or
`SKUL\\xba\\xbe` for the second copy, version 2, hdr_size including the JSON area, seqid,
label, checksum_alg, salt, uuid, subsystem, hdr_offset, checksum) followed by the JSON area,
NUL-padded to hdr_size. The checksum is the checksum_alg hash of the binary header (checksum
field zeroed) and the whole JSON area. The primary copy is at 0 and the secondary right after
it (at hdr_size); when the primary is unreadable the secondary is looked for at every offset
LUKS2 allows (16 KiB .. 4 MiB). With both valid, the higher seqid wins, as cryptsetup reads it.
nbdcrypt never writes: a damaged copy is reported (`cryptsetup repair` restores it), not fixed.
luks2_metadata.py reads the JSON.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from nbdcrypt.luks import LuksError, hashes
from nbdcrypt.luks.header import MAGIC, MAGIC2, LuksHeader
from nbdcrypt.luks.luks2_metadata import build

BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
BINARY_SIZE = 4096
CSUM_AT = BINARY.size - 64
MIN_HDR_SIZE = 0x4000
MAX_HDR_SIZE = 0x400000
SECONDARY_OFFSETS = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB


@dataclass(frozen=True, slots=True)
class Copy:
    """One valid header copy: its binary fields and its parsed JSON."""

    offset: int
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    uuid: str
    subsystem: str
    metadata: object  # the JSON document


def _field(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def _read(fd: int, length: int, offset: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = os.pread(fd, length - len(data), offset + len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_copy(fd: int, offset: int, *, secondary: bool) -> Copy | str:
    """The header copy at `offset`, or why it is unusable."""
    binary = _read(fd, BINARY_SIZE, offset)
    if len(binary) < BINARY_SIZE:
        return f"truncated: the file ends at {offset + len(binary)}, inside the binary header"
    fields = BINARY.unpack_from(binary)
    magic, version, hdr_size, seqid = fields[0], fields[1], fields[2], fields[3]
    if magic != (MAGIC2 if secondary else MAGIC):
        return "no LUKS2 magic"
    if version != 2:
        return f"version {version}, not 2"
    if fields[9] != offset:
        return f"it says it is at offset {fields[9]}, not {offset}"
    if not MIN_HDR_SIZE <= hdr_size <= MAX_HDR_SIZE or (secondary and hdr_size != offset):
        return f"bad header size {hdr_size}"
    area = _read(fd, hdr_size - BINARY_SIZE, offset + BINARY_SIZE)
    if len(area) < hdr_size - BINARY_SIZE:
        return (
            f"truncated: the JSON area needs bytes {offset + BINARY_SIZE}..{offset + hdr_size}, "
            f"the file ends at {offset + BINARY_SIZE + len(area)}"
        )
    alg = _field(fields[5])
    problem = _checksum_problem(alg, binary, area)
    if problem:
        return problem
    metadata = _json(area)
    if isinstance(metadata, str):
        return metadata
    return Copy(
        offset, hdr_size, seqid, _field(fields[4]), alg, _field(fields[7]), _field(fields[8]),
        metadata,
    )  # fmt: skip


def _checksum_problem(alg: str, binary: bytes, area: bytes) -> str:
    try:
        h = hashes.new(alg)
    except ValueError as exc:
        return f"checksum: {exc}"
    if h.digest_size > 64:
        return f"checksum: hash {alg!r} is longer than the checksum field"
    h.update(binary[:CSUM_AT])
    h.update(bytes(64))
    h.update(binary[BINARY.size :])
    h.update(area)
    if not hmac.compare_digest(h.digest(), binary[CSUM_AT : CSUM_AT + h.digest_size]):
        return f"checksum ({alg}) mismatch: the header copy is damaged"
    return ""


def _json(area: bytes) -> object:
    """The JSON document of an area: `{...}` then only NUL bytes; a string says why not."""
    end = area.find(b"\0")
    if not area.startswith(b"{") or end < 0 or area[end:].count(0) != len(area) - end:
        return "the JSON area is not one JSON object padded with NUL bytes"
    try:
        return json.loads(area[:end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"the JSON area does not parse: {exc}"


def has_secondary(fd: int) -> bool:
    """A second LUKS2 copy's magic at one of the offsets LUKS2 allows."""
    return any(_read(fd, len(MAGIC2), offset) == MAGIC2 for offset in SECONDARY_OFFSETS)


def _secondary(fd: int, primary: Copy | str) -> Copy | str:
    if isinstance(primary, Copy):
        return read_copy(fd, primary.hdr_size, secondary=True)
    reasons = []
    for offset in SECONDARY_OFFSETS:
        copy = read_copy(fd, offset, secondary=True)
        if isinstance(copy, Copy):
            return copy
        if copy != "no LUKS2 magic" and not copy.startswith("truncated: the file ends"):
            reasons.append(f"at {offset}: {copy}")
    return "; ".join(reasons) or "not found"


def choose(path: Path, primary: Copy | str, secondary: Copy | str) -> tuple[Copy, list[str]]:
    """The copy cryptsetup would use, and notes about a damaged one."""
    if isinstance(primary, Copy) and isinstance(secondary, Copy):
        return (secondary if secondary.seqid > primary.seqid else primary), []
    if isinstance(primary, Copy):
        return primary, [f"the secondary header copy is unusable ({secondary})"]
    if isinstance(secondary, Copy):
        note = (
            f"the primary header copy is unusable ({primary}); using the secondary copy at "
            f"{secondary.offset} (cryptsetup repair restores the primary)"
        )
        return secondary, [note]
    lead = "truncated" if primary.startswith("truncated") else "corrupt LUKS2 header"
    raise LuksError(f"{path}: {lead}: primary copy: {primary}; secondary copy: {secondary}")


def parse(fd: int, path: Path, file_size: int) -> LuksHeader:
    """The header of a file whose first bytes hold a LUKS2 magic (or a second copy's)."""
    primary = read_copy(fd, 0, secondary=False)
    copy, notes = choose(path, primary, _secondary(fd, primary))
    return build(copy, path, file_size, tuple(notes))
