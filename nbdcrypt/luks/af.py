"""The anti-forensic information merger of LUKS (cryptsetup's AF_merge, LUKS1 spec section 2.4).

A keyslot stores the volume key split into `stripes` blocks of the key's size: all but the last
are random, and the last is the key XOR the diffusion of the others. Merging runs the chain
`d = diffuse(d XOR s_i)` over the first stripes - 1 blocks from d = 0, then key = d XOR the
last. Diffusion hashes the block in pieces of the hash's digest size: piece j becomes
H(j as 4 big-endian bytes || piece j), cut to the piece's length for a short last piece. So a
single damaged bit anywhere in the stored stripes gives a wrong key, and wiping a keyslot area
only partly still destroys the key.
"""

from __future__ import annotations

import numpy as np

from nbdcrypt.luks import hashes

Buffer = bytes | bytearray | memoryview


def diffuse(block: bytearray, hash_name: str) -> None:
    """Diffuse `block` in place."""
    size = hashes.digest_size(hash_name)
    view = memoryview(block)
    for index, start in enumerate(range(0, len(block), size)):
        piece = view[start : start + size]
        h = hashes.new(hash_name, index.to_bytes(4, "big"))
        h.update(piece)
        piece[:] = h.digest()[: len(piece)]


def af_merge(material: Buffer, key_size: int, stripes: int, hash_name: str) -> bytearray:
    """The key of `key_size` bytes merged from the first key_size * stripes bytes of material.

    The result is a new bytearray; the running block is wiped in place as it goes.
    """
    if stripes < 1 or key_size < 1:
        raise ValueError("AF merge needs at least one stripe of at least one byte")
    if len(memoryview(material)) < key_size * stripes:
        raise ValueError(f"AF merge needs {key_size * stripes} bytes of split key material")
    hashes.check_hash(hash_name)
    rows = np.frombuffer(material, dtype=np.uint8, count=key_size * stripes).reshape(
        stripes, key_size
    )
    key = bytearray(key_size)
    acc = np.frombuffer(key, dtype=np.uint8)
    for row in rows[:-1]:
        np.bitwise_xor(acc, row, out=acc)
        diffuse(key, hash_name)
    np.bitwise_xor(acc, rows[-1], out=acc)
    return key
