"""`nbdcrypt luks dump [--passphrase-file F] FILE` (a LUKS header's public fields), and what
`nbdcrypt check` prints for a luks device.

Exit status 0 with the dump on stdout; 1 with one line on stderr when FILE is no usable LUKS
header or the passphrase opens no keyslot; 2 for usage errors (argparse).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nbdcrypt import __version__
from nbdcrypt.crypto.secret import SecretBytes
from nbdcrypt.luks import LuksError
from nbdcrypt.luks.device import image_name
from nbdcrypt.luks.dump import dump
from nbdcrypt.luks.header import SECTOR, LuksHeader, read_header
from nbdcrypt.luks.mapping import crypt_line
from nbdcrypt.luks.unlock import unlock


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `luks` and its commands to the `nbdcrypt` command line."""
    luks = sub.add_parser(
        "luks",
        help="inspect LUKS1/LUKS2 images: dump",
        description="Inspect LUKS1 and LUKS2 images without cryptsetup.",
    )
    luks.add_argument("--version", action="version", version=f"nbdcrypt {__version__}")
    commands = luks.add_subparsers(dest="luks_command", required=True, metavar="COMMAND")
    dump_cmd = commands.add_parser(
        "dump",
        help="print a LUKS header's public fields",
        description="Print a LUKS header's public fields, as cryptsetup luksDump does, without "
        "key material: version, UUID, cipher, key size, sector size, payload offset and size, "
        "keyslots with their KDF parameters, digests. With --passphrase-file, also say which "
        "keyslot the passphrase opens (the key itself is never printed).",
    )
    dump_cmd.add_argument("file", type=Path, metavar="FILE", help="a LUKS image or block device")
    dump_cmd.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="F",
        help="a passphrase file (used whole, as cryptsetup --key-file; mode 0600)",
    )
    dump_cmd.add_argument(
        "--key-slot", type=int, metavar="N", help="with --passphrase-file: try only keyslot N"
    )
    dump_cmd.set_defaults(func=run_dump)


def run_dump(args: argparse.Namespace) -> int:
    try:
        header = read_header(args.file)
        text = dump(header)
        if args.passphrase_file is not None:
            key = unlock(header, args.passphrase_file, keyslot=args.key_slot)
            key.wipe()
            text += f"\nPassphrase:       keyslot {key.keyslot} opens with {args.passphrase_file}"
        elif args.key_slot is not None:
            print("nbdcrypt: luks dump: --key-slot needs --passphrase-file", file=sys.stderr)
            return 2
    except LuksError as exc:
        print(f"nbdcrypt: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def check_lines(
    name: str, header: LuksHeader, passphrase_file: Path, keyslot: int | None
) -> list[str]:
    """What `nbdcrypt check` prints for a luks device; it unlocks the header to say which
    keyslot the passphrase opens (the key is wiped at once and never shown)."""
    segment = header.segment
    key = unlock(header, passphrase_file, keyslot=keyslot, label=name)
    key.wipe()
    kdf = next(k.kdf.name for k in header.keyslots if k.number == key.keyslot)
    masked = crypt_line(header, SecretBytes(bytes(header.key_size)), image_name(name))
    lines = [
        f"  {name}: luks{header.version} {header.path}, payload {_human(header.payload_size)}",
        f"    {segment.cipher}, {header.key_size * 8}-bit key, {segment.sector_size}-byte "
        f"sectors, payload at byte {segment.offset} (sector {segment.offset // SECTOR}), "
        f"iv_tweak {segment.iv_tweak}, UUID {header.uuid}",
        f"    passphrase file {passphrase_file}: opens keyslot {key.keyslot} ({kdf})",
        f"    {masked.text()}",
    ]
    return lines + [f"    note: {note}" for note in header.notes]


def _human(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB ({size} bytes)"
