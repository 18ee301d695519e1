"""The text of `nbdcrypt luks dump`: a header's public fields, like `cryptsetup luksDump`.

Version, UUID, data segment (cipher, key size, sector size, offset, size, IV tweak), keyslots
with their KDF and AF parameters and areas, digests with their hash and iterations, LUKS2
tokens and flags. Never key material: no volume key, and no salts or digest values either
(they are public, but nothing here needs them).
"""

from __future__ import annotations

from nbdcrypt.luks.header import SECTOR, Argon2, Keyslot, LuksHeader

PRIORITIES = {0: "ignore", 1: "normal", 2: "high"}


def _bytes(n: int) -> str:
    return f"{n} bytes ({n // SECTOR} sectors)" if n % SECTOR == 0 else f"{n} bytes"


def _kdf(slot: Keyslot) -> str:
    kdf = slot.kdf
    if isinstance(kdf, Argon2):
        return f"{kdf.variant}, time {kdf.time}, memory {kdf.memory} KiB, cpus {kdf.cpus}"
    return f"pbkdf2 {kdf.hash}, {kdf.iterations} iterations"


def _keyslot(header: LuksHeader, slot: Keyslot) -> list[str]:
    digests = [str(d.number) for d in header.digests if slot.number in d.keyslots]
    opens = "yes" if slot.number in header.digest.keyslots else "no"
    lines = [
        f"  {slot.number}: {'luks2' if header.version == 2 else 'enabled'}"
        + (f", priority {PRIORITIES[slot.priority]}" if header.version == 2 else ""),
        f"    Key size:       {slot.key_size * 8} bits",
        f"    PBKDF:          {_kdf(slot)}",
        f"    AF:             {slot.stripes} stripes, {slot.af_hash}",
        f"    Area cipher:    {slot.area_cipher}, {slot.area_key_size * 8}-bit key",
        f"    Area:           offset {_bytes(slot.area_offset)}, size {slot.area_size} bytes",
    ]
    if header.version == 2:
        lines.append(f"    Digest:         {', '.join(digests) or 'none'}")
    lines.append(f"    Opens the data: {opens}")
    return lines


def _segment(header: LuksHeader) -> list[str]:
    segment = header.segment
    size = _bytes(header.payload_size)
    if segment.size is None:
        size = f"dynamic, {size} (to the end of the file)"
    return [
        f"Data segment:     {segment.number}: crypt",
        f"  Cipher:         {segment.cipher}",
        f"  Key size:       {header.key_size * 8} bits",
        f"  Sector size:    {segment.sector_size} bytes",
        f"  Payload offset: {_bytes(segment.offset)}",
        f"  Payload size:   {size}",
        f"  IV tweak:       {segment.iv_tweak}",
    ]


def dump(header: LuksHeader) -> str:
    """The dump of a parsed header."""
    lines = [f"LUKS header of {header.path}", f"Version:          {header.version}"]
    lines.append(f"UUID:             {header.uuid}")
    if header.version == 1:
        lines.append(f"Hash spec:        {header.hash_spec}")
    else:
        lines += [
            f"Label:            {header.label or '(no label)'}",
            f"Subsystem:        {header.subsystem or '(no subsystem)'}",
            f"Sequence id:      {header.seqid}",
            f"Metadata area:    {header.header_size} bytes per copy, checksum "
            f"{header.checksum_alg}",
            f"Keyslots area:    {header.keyslots_size} bytes",
            f"Flags:            {' '.join(header.flags) or '(no flags)'}",
        ]
    lines += _segment(header)
    lines.append("Keyslots:")
    for slot in header.keyslots:
        lines += _keyslot(header, slot)
    if header.version == 2:
        lines.append("Tokens:" + ("" if header.tokens else " (none)"))
        lines += [f"  {token}" for token in header.tokens]
    lines.append("Digests:")
    for digest in header.digests:
        slots = ", ".join(map(str, digest.keyslots)) if header.version == 2 else "all"
        lines.append(
            f"  {digest.number}: pbkdf2 {digest.hash}, {digest.iterations} iterations, "
            f"keyslots {slots}"
        )
    lines += [f"Note: {note}" for note in header.notes]
    return "\n".join(lines)
