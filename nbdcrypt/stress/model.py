"""What a client's own region must read as: the model its reads are verified against.

The region is cut into grains (the alignment unit). Each grain is in one of four states:

- KNOWN: it reads exactly as `data` holds (written, zeroed, or read once before).
- ADOPT: nothing is known yet (the export's content before the run). The first read of it is
  taken as the truth, and the grain becomes KNOWN: from then on it must read the same.
- TRIMMED: trimmed after being KNOWN. Each byte may read as the old byte (`data` still holds
  it) or as zero, for as long as it is not written again: a server may discard or ignore a
  trim, or discard only part of the range, and not necessarily at once.
- ANY: anything goes until the next write or write-zeroes: after a trim of an ADOPT grain (its
  old content is unknown), after any trim when the export may leave unspecified content there
  (the NBD spec allows it; an encrypted export does it, since a hole below decrypts to noise),
  and after a WRITE, TRIM or WRITE_ZEROES that failed and may have been partly done.

The client never has a read in flight over a range it is modifying, nor two modifications of
one range (see client.py), so applying a modification when it is issued and checking a read
when its reply arrives sees exactly what the server had to do. The checks are numpy
comparisons over the read's bytes; a mismatch reports the first differing byte, how many
differ, and a few bytes of what was expected and what was found, never whole buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

KNOWN, ADOPT, TRIMMED, ANY = 0, 1, 2, 3
SNIPPET = 16  # bytes of expected and found data a mismatch report shows

U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A read that returned what it should not have: where, and what differs first."""

    offset: int  # the read's offset and length
    length: int
    at: int  # the export offset of the first differing byte
    differing: int  # how many bytes of the read differ
    expected: bytes  # SNIPPET bytes from `at` (of the first allowed version)
    found: bytes
    rule: str  # what the read had to return there, in words

    def describe(self) -> str:
        return (
            f"{self.differing} of {self.length} bytes differ, the first at {self.at:#x} "
            f"({self.rule}): expected {self.expected.hex(' ')}, found {self.found.hex(' ')}"
        )


class RegionModel:
    """The expected content of [start, start + length) of an export, in grains."""

    def __init__(self, start: int, length: int, grain: int) -> None:
        if grain <= 0 or length % grain or start % grain:
            raise ValueError(f"region {start}+{length} is not in whole {grain}-byte grains")
        self.start = start
        self.length = length
        self.grain = grain
        self.data: U8 = np.zeros(length, dtype=np.uint8)
        self.state: U8 = np.full(length // grain, ADOPT, dtype=np.uint8)

    def _grains(self, offset: int, length: int) -> slice:
        lo = offset - self.start
        if lo < 0 or lo + length > self.length or lo % self.grain or length % self.grain:
            raise ValueError(f"{offset:#x}+{length} is not whole grains of the region")
        return slice(lo // self.grain, (lo + length) // self.grain)

    def _bytes(self, offset: int, length: int) -> slice:
        lo = offset - self.start
        return slice(lo, lo + length)

    # Modifications ----------------------------------------------------------------------------

    def write(self, offset: int, payload: bytes | bytearray | memoryview) -> None:
        grains = self._grains(offset, len(payload))
        self.data[self._bytes(offset, len(payload))] = np.frombuffer(payload, dtype=np.uint8)
        self.state[grains] = KNOWN

    def zero(self, offset: int, length: int) -> None:
        grains = self._grains(offset, length)
        self.data[self._bytes(offset, length)] = 0
        self.state[grains] = KNOWN

    def trim(self, offset: int, length: int, *, any_content: bool = False) -> None:
        """A trim: old-or-zero per byte, or ANY if the export may leave anything there."""
        grains = self._grains(offset, length)
        state = self.state[grains]
        if any_content:
            state[:] = ANY
        else:  # an unknown old content, or zero: nothing to check until it is written
            state[state == ADOPT] = ANY
            state[state == KNOWN] = TRIMMED

    def forget(self, offset: int, length: int) -> None:
        """A modification failed: the range may hold anything until it is written again."""
        self.state[self._grains(offset, length)] = ANY

    # Reads ------------------------------------------------------------------------------------

    def check_read(self, offset: int, got: bytes | bytearray | memoryview) -> Mismatch | None:
        """Verify what a read returned; ADOPT grains take what was read."""
        length = len(got)
        grains = self._grains(offset, length)
        found = np.frombuffer(got, dtype=np.uint8)
        expected = self.data[self._bytes(offset, length)]
        state = self.state[grains]
        if not state.any():  # all KNOWN: the common case
            bad = expected != found
            if not bad.any():
                return None
            return self._mismatch(offset, found, expected, bad, "data written or read before")
        per_byte = np.repeat(state, self.grain) if self.grain > 1 else state
        differs = expected != found
        bad = differs & ((per_byte == KNOWN) | ((per_byte == TRIMMED) & (found != 0)))
        adopt = state == ADOPT
        if adopt.any():
            take = per_byte == ADOPT
            expected[take] = found[take]
            state[adopt] = KNOWN
        if not bad.any():
            return None
        first = int(np.argmax(bad))
        rule = "trimmed: old data or zeroes" if per_byte[first] == TRIMMED else "data written"
        return self._mismatch(offset, found, expected, bad, rule)

    def _mismatch(
        self, offset: int, found: U8, expected: U8, bad: npt.NDArray[np.bool_], rule: str
    ) -> Mismatch:
        first = int(np.argmax(bad))
        return Mismatch(
            offset=offset,
            length=len(found),
            at=offset + first,
            differing=int(np.count_nonzero(bad)),
            expected=expected[first : first + SNIPPET].tobytes(),
            found=found[first : first + SNIPPET].tobytes(),
            rule=rule,
        )
