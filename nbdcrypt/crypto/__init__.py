"""Block-device ciphers over whole requests: many data units per call, kernel-compatible output.

`XtsCipher` (AES-XTS) and `CbcCipher` (AES-CBC with plain or ESSIV IVs) encrypt or decrypt a
request of equal-sized data units in one call; unit i uses the IV number first + i * step.
The dm-crypt target and the blk-crypto layer build on them.
"""

from __future__ import annotations

from nbdcrypt.crypto.cbc import CbcCipher
from nbdcrypt.crypto.xts import XtsCipher

UnitCipher = XtsCipher | CbcCipher

__all__ = ["CbcCipher", "UnitCipher", "XtsCipher"]
