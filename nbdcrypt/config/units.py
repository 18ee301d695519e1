"""Sizes and durations as people write them, in the config file and on the command line.

Every parser here raises ValueError with a message fit to show the user as it is.
"""

from __future__ import annotations

import math
import re

from .model import SECTOR

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
MAX_SIZE = (1 << 63) - SECTOR  # the largest multiple of 512 an off_t can hold
MAX_DURATION = 86400.0  # one day: longer timeouts are mistakes, and overflow some event loops
_MAX_DIGITS = 30  # longer numbers are typos; Python also refuses to parse > 4300 digits

_SIZE_UNITS = {"": 1, "k": KIB, "kib": KIB, "m": MIB, "mib": MIB, "g": GIB, "gib": GIB}
_SIZE_UNITS |= {"t": TIB, "tib": TIB}
_SIZE = re.compile(r"\s*([0-9][0-9_]*)\s*([A-Za-z]*)\s*\Z")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*\Z")


def parse_int(text: str) -> int:
    """A decimal integer with optional sign and `_` separators, as YAML writes them."""
    digits = text.replace("_", "")
    if not re.fullmatch(r"[-+]?[0-9]+", digits) or len(digits) > _MAX_DIGITS:
        raise ValueError(f"invalid integer {text!r}")
    return int(digits)


def parse_bytes(value: int | str) -> int:
    """A byte count > 0: an int, or a string like "4096", "64M", "1 GiB" (binary multiples)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size, got {type(value).__name__}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match[2].lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"invalid size {value!r} (expected bytes, or a whole number with K, M, G, T,"
                " KiB, MiB, GiB or TiB)"
            )
        value = parse_int(match[1]) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"size must be greater than 0, got {value}")
    return value


def parse_size(value: int | str) -> int:
    """A device size: as parse_bytes, and also a multiple of 512 below 8 EiB."""
    size = parse_bytes(value)
    if size % SECTOR:
        raise ValueError(f"{size} is not a multiple of {SECTOR} bytes")
    if size > MAX_SIZE:
        raise ValueError(f"{size} bytes is too large (at most {MAX_SIZE}, just under 8 EiB)")
    return size


def parse_duration(value: int | float | str) -> float:
    """Seconds >= 0: a number, or a string like "10s", "500ms", "50us", "2m", "1h", "1.5"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if isinstance(value, str):
        match = _DURATION.match(value)
        unit = match[2].lower() if match else ""
        if match is None or unit not in _DURATION_UNITS:
            raise ValueError(
                f"invalid duration {value!r} (expected seconds, or a number with a unit:"
                " us, ms, s, m, h)"
            )
        seconds = float(match[1]) * _DURATION_UNITS[unit]
    elif isinstance(value, int):
        seconds = float(max(-1, min(value, MAX_DURATION + 1)))  # float() of a huge int overflows
    else:
        seconds = value
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r} (must be a finite number >= 0)")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is too long (at most {MAX_DURATION:g} s, one day)")
    return seconds
