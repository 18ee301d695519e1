"""Table lines in dmsetup syntax, and a table's rules: lines from sector 0, no gaps, no overlaps.

A line is `<start> <length> <target> <args...>` in 512-byte sectors. Parsing checks the target's
own arguments (TargetSpec.parse); `check_lines` checks the lines against each other. Errors are
TableError with a message that names the line (1-based) and the reason; the config loader and
`ctl load` add the file or device around it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nbdcrypt.device import Device
from nbdcrypt.dm.target import SECTOR, DeviceRef, Target, TargetError, TargetSpec, is_number, shown
from nbdcrypt.targets import TARGETS


class TableError(ValueError):
    """A table is wrong; the message names the line and the reason."""


@dataclass(frozen=True, slots=True)
class TableLine:
    start: int  # sectors
    length: int  # sectors
    spec: TargetSpec

    @property
    def target(self) -> str:
        return self.spec.name

    def text(self) -> str:
        args = self.spec.args_text()
        return f"{self.start} {self.length} {self.spec.name}" + (f" {args}" if args else "")

    def refs(self) -> list[DeviceRef]:
        return self.spec.refs(self.length * SECTOR)


def parse_line(text: str, number: int = 1) -> TableLine:
    """One dmsetup table line; `number` names it in errors."""
    words = text.split()
    if len(words) < 3:
        raise TableError(f"line {number}: expected '<start> <length> <target> <args...>'")
    start_text, length_text, target, *args = words
    for what, value in (("start", start_text), ("length", length_text)):
        if not is_number(value):
            raise TableError(
                f"line {number}: {what} must be a number of sectors, not {shown(value)}"
            )
    start, length = int(start_text), int(length_text)
    if length == 0:
        raise TableError(f"line {number}: length must not be 0")
    spec_type = TARGETS.get(target)
    if spec_type is None:
        known = ", ".join(sorted(TARGETS))
        raise TableError(f"line {number}: unknown target {shown(target)} (known: {known})")
    try:
        spec = spec_type.parse(args, length * SECTOR)
    except TargetError as exc:
        raise TableError(f"line {number}: {target}: {exc}") from None
    return TableLine(start, length, spec)


def parse_table(lines: Sequence[str]) -> tuple[TableLine, ...]:
    """Parse and check a whole table (blank lines and # comments are skipped)."""
    parsed, numbers = [], []
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if text:
            parsed.append(parse_line(text, number))
            numbers.append(number)
    check_lines(parsed, numbers)
    return tuple(parsed)


def check_lines(lines: Sequence[TableLine], numbers: Sequence[int] | None = None) -> None:
    """Lines must start at sector 0 and follow each other without gaps or overlaps.

    `numbers` names the lines in errors (default: 1, 2, ...).
    """
    if not lines:
        raise TableError("a table needs at least one line")
    expected = 0
    for number, line in zip(numbers or range(1, len(lines) + 1), lines, strict=True):
        if line.start > expected:
            raise TableError(
                f"line {number}: starts at sector {line.start}, leaving a gap after {expected}"
            )
        if line.start < expected:
            raise TableError(
                f"line {number}: starts at sector {line.start}, overlapping the line before "
                f"(which ends at {expected})"
            )
        expected = line.start + line.length


def table_size(lines: Sequence[TableLine]) -> int:
    """The size in bytes of a device with this table: the end of its last line."""
    last = lines[-1]
    return (last.start + last.length) * SECTOR


@dataclass(frozen=True, slots=True)
class Table:
    """A built table: its lines and running targets, with byte offsets for lookup."""

    lines: tuple[TableLine, ...]
    targets: tuple[Target, ...]
    starts: tuple[int, ...]  # bytes
    size: int

    @classmethod
    def build(cls, lines: Sequence[TableLine], devices: Mapping[str, Device]) -> Table:
        targets = tuple(line.spec.build(line.length * SECTOR, devices) for line in lines)
        starts = tuple(line.start * SECTOR for line in lines)
        return cls(tuple(lines), targets, starts, table_size(lines))

    def text(self) -> str:
        return "\n".join(line.text() for line in self.lines)
