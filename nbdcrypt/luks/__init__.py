"""LUKS1 and LUKS2 containers, read without external tools: headers, KDFs, AF merge, unlock.

A `luks` device of the config opens an image made by `cryptsetup luksFormat` or
`qemu-img create -f luks` with a passphrase file and serves its payload decrypted, as
`cryptsetup open` does: a crypt table over the payload area (docs/LUKS.md). The modules:
header.py (the parsed header, version detection), luks1.py and luks2.py (the on-disk formats),
hashes.py, kdf.py and af.py (the primitives), unlock.py (passphrase to volume key),
mapping.py (header to crypt table line and keyring key), device.py (the running device),
dump.py and cli.py (`nbdcrypt luks dump`).
"""

from __future__ import annotations


class LuksError(Exception):
    """A LUKS header or passphrase can't be used; one line naming the file and the reason.

    Messages never hold key material or passphrase bytes.
    """
