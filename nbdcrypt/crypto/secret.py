"""Key material that never shows: not in repr, str, f-strings, logs or tracebacks' locals."""

from __future__ import annotations

import hmac
from typing import NoReturn


class SecretBytes:
    """Bytes that print as `<secret: N bytes>`; `reveal()` hands them to a cipher."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<secret: {len(self._value)} bytes>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash((SecretBytes, len(self._value)))

    def __reduce__(self) -> NoReturn:
        raise TypeError("secret key material is not picklable")
