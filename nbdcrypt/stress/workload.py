"""The operations of one stress client: a seeded, endless, repeatable sequence.

A client's sequence depends only on the seed, the export's position among the URIs, the
client's number among that export's clients, its layout (region, alignment, sizes) and the mix:
never on timing. So the same seed replays the same operations, whatever the server does; the
runner delays an operation that would overlap one in flight, it never skips or reorders one.

Sizes are spread logarithmically between one alignment unit and the largest size (small
requests are common, large ones regular), offsets uniformly over the client's region, both in
whole alignment units. Shared-region writes go to cells the client owns, shared reads span one
to four cells of any owner, and every FLUSH_EVERY-th shared write is followed by a FLUSH so that
what other clients may read stays bounded.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

FLUSH_EVERY = 8  # shared writes between the FLUSHes a client issues for the shared region
SHARED_READ_CELLS = 4  # the most cells one shared read spans


class Kind(Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    TRIM = "trim"
    ZERO = "zero"
    SHARED_READ = "shared-read"
    SHARED_WRITE = "shared-write"

    @property
    def modifies(self) -> bool:
        return self in (Kind.WRITE, Kind.TRIM, Kind.ZERO, Kind.SHARED_WRITE)

    @property
    def shared(self) -> bool:
        return self in (Kind.SHARED_READ, Kind.SHARED_WRITE)


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: absolute export offset and length (0 for FLUSH)."""

    seq: int  # the client's operation number, from 0
    kind: Kind
    offset: int = 0
    length: int = 0
    fua: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    def __str__(self) -> str:
        fua = " fua" if self.fua else ""
        if self.kind is Kind.FLUSH:
            return f"#{self.seq} flush{fua}"
        return f"#{self.seq} {self.kind.value} {self.offset:#x}+{self.length}{fua}"


@dataclass(frozen=True, slots=True)
class SharedLayout:
    """The shared region of an export: `cells` cells of `cell` bytes from `start`; cell i is
    written by member i % members and read by everyone."""

    start: int
    cell: int
    cells: int
    members: int

    def owner(self, cell: int) -> int:
        return cell % self.members

    def cell_of(self, offset: int) -> int:
        return (offset - self.start) // self.cell


@dataclass(frozen=True, slots=True)
class ClientLayout:
    """Where one client works on its export."""

    client: int  # its number in the whole run
    export: int  # the index of its URI
    member: int  # its number among the clients of that export
    region_start: int
    region_length: int
    align: int
    max_size: int
    shared: SharedLayout | None = None

    def owned_cells(self) -> list[int]:
        s = self.shared
        if s is None:
            return []
        return list(range(self.member, s.cells, s.members))


class Workload:
    """The endless, repeatable operation sequence of one client."""

    def __init__(
        self,
        seed: int,
        layout: ClientLayout,
        mix: dict[Kind, int],
        fua_percent: float = 0.0,
    ) -> None:
        if not any(mix.values()):
            raise ValueError("the mix has no operation with a weight")
        self.layout = layout
        self.kinds = [k for k, w in mix.items() if w > 0]
        self.cum_weights = list(itertools.accumulate(mix[k] for k in self.kinds))
        self.fua_percent = fua_percent
        self.rng = random.Random(f"nbdcrypt-stress:{seed}:{layout.export}:{layout.member}")
        self._owned = layout.owned_cells()
        if Kind.SHARED_WRITE in self.kinds and not self._owned and len(self.kinds) == 1:
            raise ValueError(f"client {layout.client} owns no shared cell to write")

    def __iter__(self) -> Iterator[Op]:
        seq = 0
        shared_writes = 0
        while True:
            kind = self._kind()
            op = self._op(seq, kind)
            yield op
            seq += 1
            if kind is Kind.SHARED_WRITE:
                shared_writes += 1
                if shared_writes % FLUSH_EVERY == 0:
                    yield Op(seq, Kind.FLUSH)
                    seq += 1

    def _kind(self) -> Kind:
        while True:
            kind = self.rng.choices(self.kinds, cum_weights=self.cum_weights)[0]
            if kind is not Kind.SHARED_WRITE or self._owned:
                return kind

    def _op(self, seq: int, kind: Kind) -> Op:
        if kind is Kind.FLUSH:
            return Op(seq, kind)
        fua = kind.modifies and self.rng.random() * 100 < self.fua_percent
        if kind is Kind.SHARED_WRITE:
            s = self.layout.shared
            assert s is not None
            cell = self.rng.choice(self._owned)
            return Op(seq, kind, s.start + cell * s.cell, s.cell, fua)
        if kind is Kind.SHARED_READ:
            s = self.layout.shared
            assert s is not None
            count = self.rng.randint(1, min(SHARED_READ_CELLS, s.cells))
            first = self.rng.randrange(s.cells - count + 1)
            return Op(seq, kind, s.start + first * s.cell, count * s.cell)
        offset, length = self._range()
        return Op(seq, kind, offset, length, fua)

    def _range(self) -> tuple[int, int]:
        lay = self.layout
        units = lay.region_length // lay.align
        most = min(units, lay.max_size // lay.align)
        count = min(most, max(1, int((most + 1) ** self.rng.random())))
        first = self.rng.randrange(units - count + 1)
        return lay.region_start + first * lay.align, count * lay.align
