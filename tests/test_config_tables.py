"""`table:` devices in the config: what valid stacks become, and where bad ones are reported."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.cli import describe, stack
from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import (
    FileDeviceConfig,
    MemoryDeviceConfig,
    TableDeviceConfig,
)
from nbdcrypt.dm.table import TableLine, table_size
from nbdcrypt.request import Op, Request
from nbdcrypt.server.app import Server
from nbdcrypt.targets.delay import DelaySpec, Leg
from nbdcrypt.targets.flakey import FlakeySpec
from nbdcrypt.targets.linear import LinearSpec
from nbdcrypt.targets.striped import StripedSpec
from nbdcrypt.targets.zero import ErrorSpec, ZeroSpec

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30

# Lines 1-3; the devices start on line 4. Devices a and b are 1024 sectors each.
HEAD = "server: {listen: tcp://127.0.0.1:10809}\nexports: {e: {device: a}}\ndevices:\n"
AB = "  a: {memory: 512K}\n  b: {memory: 512K}\n"  # lines 4-5


def write(directory: Path, text: str) -> Path:
    path = directory / "c.yaml"
    path.write_text(text)
    return path


def error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# --- valid stacks ----------------------------------------------------------------------------

STACKS = """\
server: {listen: tcp://127.0.0.1:10809}
devices:
  top: {table: ["0 1000 linear pool 0"]}
  pool:
    table:
      - 0 2097152 striped 2 128 a 0 b 0
      - 2097152 1024 zero
    allow_overlap: false        # optional
  a: {file: a.img, size: 1G}
  b: {file: b.img, size: 1G}
exports:
  top: {device: top}
  pool: {device: pool, readonly: true}
"""


def test_stack_values_and_dependency_order(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, STACKS))
    pool = TableDeviceConfig(
        "pool",
        (
            TableLine(0, 2097152, StripedSpec(128, (("a", 0), ("b", 0)))),
            TableLine(2097152, 1024, ZeroSpec()),
        ),
        (2097152 + 1024) * 512,
    )
    top = TableDeviceConfig("top", (TableLine(0, 1000, LinearSpec("pool", 0)),), 1000 * 512)
    assert config.devices == {
        "pool": pool,
        "top": top,
        "a": FileDeviceConfig("a", tmp_path / "a.img", GIB, create=True),
        "b": FileDeviceConfig("b", tmp_path / "b.img", GIB, create=True),
    }
    # every device after the devices its table names; otherwise the order of the file
    assert list(config.devices) == ["a", "b", "pool", "top"]
    assert config.exports["top"].device == "top"
    assert config.exports["pool"].device == "pool"
    assert not (tmp_path / "a.img").exists()


def test_order_keeps_the_file_order_where_it_can(tmp_path: Path) -> None:
    text = (
        HEAD
        + "  z: {memory: 1M}\n"
        + "  t2: {table: ['0 8 linear t1 0', '8 8 linear z 0']}\n"
        + AB
        + "  t1: {table: ['0 16 linear b 0']}\n"
        + "  t3: {table: ['0 8 linear a 0']}\n"
    )
    config = load_config(write(tmp_path, text))
    assert list(config.devices) == ["z", "b", "t1", "t2", "a", "t3"]


def test_block_string_is_the_same_table(tmp_path: Path) -> None:
    listed = HEAD + AB + "  t:\n    table:\n      - 0 1024 linear a 0\n      - 1024 1024 zero\n"
    block = (
        HEAD
        + AB
        + "  t:\n"
        + "    table: |  # a literal block: one table line per line\n"
        + "      # start length target args\n"
        + "      0 1024 linear a 0   # all of a\n"
        + "\n"
        + "      1024 1024 zero\n"
    )
    expected = load_config(write(tmp_path, listed)).devices["t"]
    assert load_config(write(tmp_path, block)).devices["t"] == expected
    for header in ("|-", "|+", "|2"):
        variant = block.replace("table: |", f"table: {header}")
        assert load_config(write(tmp_path, variant)).devices["t"] == expected


def test_single_string_and_folded_list_items(tmp_path: Path) -> None:
    text = (
        HEAD
        + AB
        + "  one: {table: 0 8 linear a 0}\n"
        + "  long:\n"
        + "    table:\n"
        + "      - 0 2000 striped 2 8\n"
        + "        a 8 b 8\n"  # a plain scalar over two lines is one line
        + "      - '2000 8 error # trailing comment'\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.devices["one"] == TableDeviceConfig(
        "one", (TableLine(0, 8, LinearSpec("a", 0)),), 4096
    )
    assert config.devices["long"] == TableDeviceConfig(
        "long",
        (
            TableLine(0, 2000, StripedSpec(8, (("a", 8), ("b", 8)))),
            TableLine(2000, 8, ErrorSpec()),
        ),
        2008 * 512,
    )


def test_every_target_and_references_into_tables(tmp_path: Path) -> None:
    text = (
        HEAD
        + AB
        + "  mid:\n"
        + "    table:\n"
        + "      - 0 512 linear a 0\n"
        + "      - 512 512 flakey a 512 5 1 1 drop_writes\n"
        + "  slow: {table: ['0 1024 delay b 0 10 b 0 20']}\n"  # read and write legs: one region
        + "  top: {table: ['0 1024 linear mid 0', '1024 8 zero', '1032 8 error']}\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.devices["mid"] == TableDeviceConfig(
        "mid",
        (
            TableLine(0, 512, LinearSpec("a", 0)),
            TableLine(512, 512, FlakeySpec("a", 512, 5, 1, frozenset({"drop_writes"}))),
        ),
        1024 * 512,
    )
    leg, write_leg = Leg("b", 0, 10), Leg("b", 0, 20)
    assert config.devices["slow"] == TableDeviceConfig(
        "slow", (TableLine(0, 1024, DelaySpec(leg, write_leg, write_leg)),), 1024 * 512
    )
    assert config.devices["top"].size == 1040 * 512
    assert list(config.devices) == ["a", "b", "mid", "slow", "top"]


@pytest.mark.parametrize("flagged", ["first", "second", "both"])
def test_allow_overlap_on_either_table_suffices(tmp_path: Path, flagged: str) -> None:
    first = ", allow_overlap: true" if flagged in ("first", "both") else ""
    second = ", allow_overlap: true" if flagged in ("second", "both") else ""
    text = (
        HEAD
        + AB
        + f"  whole: {{table: ['0 1024 linear a 0']{first}}}\n"
        + f"  part: {{table: ['0 8 linear a 100']{second}}}\n"
    )
    config = load_config(write(tmp_path, text))
    whole, part = config.devices["whole"], config.devices["part"]
    assert isinstance(whole, TableDeviceConfig) and isinstance(part, TableDeviceConfig)
    assert (whole.allow_overlap, part.allow_overlap) == (bool(first), bool(second))


def test_allow_overlap_within_one_table(tmp_path: Path) -> None:
    text = HEAD + AB + "  t:\n    table: ['0 8 linear a 0', '8 8 linear a 4']\n"
    text += "    allow_overlap: true\n"
    config = load_config(write(tmp_path, text))
    assert config.devices["t"].size == 16 * 512


def test_adjacent_regions_do_not_overlap(tmp_path: Path) -> None:
    text = (
        HEAD
        + AB
        + "  lo: {table: ['0 512 linear a 0']}\n"
        + "  hi: {table: ['0 256 linear a 512', '256 256 linear a 768']}\n"
        + "  st: {table: ['0 1024 striped 2 8 b 0 b 512']}\n"  # two stripes, side by side
    )
    assert list(load_config(write(tmp_path, text)).devices) == ["a", "b", "lo", "hi", "st"]


async def test_server_opens_the_stack_in_order(tmp_path: Path) -> None:
    text = (
        HEAD
        + "  top: {table: ['0 8 linear pool 8']}\n"
        + "  pool: {table: ['0 32 striped 2 8 a 0 b 0']}\n"
        + AB
    )
    server = Server(load_config(write(tmp_path, text)))
    try:
        assert list(server.devices) == ["a", "b", "pool", "top"]
        assert server.devices["top"].size == 8 * 512
        data = bytes(range(256)) * 16
        await server.devices["top"].write(Request(Op.WRITE, 0, len(data), data=data))
        # top's sectors 0..8 are pool's 8..16: chunk 1, the first chunk of stripe b
        got = await server.devices["b"].read(Request(Op.READ, 0, len(data)))
        assert bytes(got) == data
    finally:
        server.close_devices()


# --- errors ----------------------------------------------------------------------------------

ERRORS = [
    # a line's own errors (parse_line)
    (
        "unknown-target",
        HEAD + AB + "  t: {table: ['0 8 mirror a 0']}\n",
        "6: devices.t.table[0]: unknown target 'mirror' "
        "(known: crypt, default-key, delay, error, flakey, linear, striped, zero)",
    ),
    (
        "argument-count",
        HEAD + AB + "  t:\n    table:\n      - 0 8 zero\n      - 8 8 linear a\n",
        "9: devices.t.table[1]: linear: takes 2 arguments (<dev> <offset>), got 1",
    ),
    (
        "argument-value",
        HEAD + AB + "  t: {table: ['0 1000 striped 2 128 a 0 b 0']}\n",
        "6: devices.t.table[0]: striped: each stripe's share (500 sectors) is not a multiple "
        "of chunk_sectors 128",
    ),
    (
        "offset-not-a-number",
        HEAD + AB + "  t: {table: ['0 8 linear a -1']}\n",
        "6: devices.t.table[0]: linear: offset must be a number of 512-byte sectors, not '-1'",
    ),
    (
        "too-few-words",
        HEAD + AB + "  t: {table: ['0 8']}\n",
        "6: devices.t.table[0]: expected '<start> <length> <target> <args...>'",
    ),
    (
        "length-0",
        HEAD + AB + "  t: {table: ['0 0 zero']}\n",
        "6: devices.t.table[0]: length must not be 0",
    ),
    (
        "unicode-digits",
        HEAD + AB + "  t: {table: ['\u0660 8 zero']}\n",
        "6: devices.t.table[0]: unexpected character '\u0660' (table lines are ASCII)",
    ),
    (
        "huge-number",
        HEAD + AB + "  t: {table: ['0 " + "9" * 5000 + " zero']}\n",
        "6: devices.t.table[0]: length must be a number of sectors, not '" + "9" * 40 + "'...",
    ),
    (
        "beyond-8-eib",
        HEAD + AB + "  t: {table: ['0 8 zero', '8 18014398509481984 zero']}\n",
        "6: devices.t.table[1]: ends at sector 18014398509481992, beyond the largest device "
        "size (18014398509481983 sectors, just under 8 EiB)",
    ),
    # the lines against each other (check_lines)
    (
        "not-from-0",
        HEAD + AB + "  t:\n    table:\n      - 8 8 zero\n",
        "8: devices.t.table[0]: starts at sector 8, leaving a gap after 0",
    ),
    (
        "gap",
        HEAD + AB + "  t:\n    table:\n      - 0 8 zero\n      - 16 8 zero\n",
        "9: devices.t.table[1]: starts at sector 16, leaving a gap after 8",
    ),
    (
        "lines-overlap",
        HEAD + AB + "  t:\n    table:\n      - 0 8 zero\n      - 8 8 zero\n      - 12 8 zero\n",
        "10: devices.t.table[2]: starts at sector 12, overlapping the line before (which ends "
        "at 16)",
    ),
    (
        "gap-in-block",
        HEAD + AB + "  t:\n    table: |\n      0 8 zero\n      # comment\n\n      9 8 zero\n",
        "11: devices.t.table[1]: starts at sector 9, leaving a gap after 8",
    ),
    (
        "block-line-error",
        HEAD + AB + "  t:\n    table: |-\n\n      0 8 zero\n      8 8 linear\n",
        "10: devices.t.table[1]: linear: takes 2 arguments (<dev> <offset>), got 0",
    ),
    # the shape of `table:`
    (
        "empty-list",
        HEAD + AB + "  t: {table: []}\n",
        "6: devices.t.table: expected at least one table line",
    ),
    (
        "only-comments",
        HEAD + AB + "  t:\n    table: |\n      # nothing yet\n",
        "7: devices.t.table: expected at least one table line",
    ),
    (
        "empty-item",
        HEAD + AB + "  t:\n    table:\n      - 0 8 zero\n      - '  # off'\n",
        "9: devices.t.table[1]: empty table line",
    ),
    (
        "null-item",
        HEAD + AB + "  t:\n    table:\n      -\n",
        "8: devices.t.table[0]: expected a string, got null",
    ),
    (
        "number-item",
        HEAD + AB + "  t: {table: [0]}\n",
        "6: devices.t.table[0]: expected a string, got an integer '0' (put it in quotes)",
    ),
    (
        "two-lines-in-an-item",
        HEAD + AB + "  t:\n    table:\n      - |\n        0 8 zero\n        8 8 zero\n",
        "8: devices.t.table[0]: one table line per list item",
    ),
    (
        "folded",
        HEAD + AB + "  t:\n    table: >\n      0 8 zero\n      8 8 zero\n",
        "7: devices.t.table: a folded block (>) joins its lines into one; write a literal "
        "block (|)",
    ),
    (
        "escaped-newline",
        HEAD + AB + '  t: {table: "0 8 zero\\n8 8 zero"}\n',
        "6: devices.t.table: several table lines must be a list, or a literal block (table: |)",
    ),
    (
        "mapping",
        HEAD + AB + "  t: {table: {0: zero}}\n",
        "6: devices.t.table: expected a list of table lines, or a literal block of them "
        "(table: |), got a mapping",
    ),
    (
        "table-and-size",
        HEAD + AB + "  t: {table: ['0 8 zero'], size: 4K}\n",
        "6: devices.t.size: only for file devices (a table's size is where its last line ends)",
    ),
    (
        "table-and-memory",
        HEAD + AB + "  t:\n    memory: 1M\n    table: ['0 8 zero']\n",
        "8: devices.t.table: a device has one kind; this one is already a memory device (line 7)",
    ),
    (
        "allow-overlap-on-memory",
        HEAD + AB + "  t: {memory: 1M, allow_overlap: true}\n",
        "6: devices.t.allow_overlap: only for table devices",
    ),
    (
        "allow-overlap-yes",
        HEAD + AB + "  t: {table: ['0 8 zero'], allow_overlap: yes}\n",
        "6: devices.t.allow_overlap: expected true or false, got 'yes' (yes/no/on/off are "
        "not accepted)",
    ),
    (
        "unknown-key",
        HEAD + AB + "  t: {table: ['0 8 zero'], overlap: true}\n",
        "6: devices.t.overlap: unknown key "
        "(allowed: file, size, memory, table, luks, allow_overlap, inline_crypto)",
    ),
    (
        "no-kind",
        HEAD + AB + "  t: {allow_overlap: true}\n",
        "6: devices.t: missing the device kind: 'file: PATH', 'memory: SIZE', "
        "'table: [LINE, ...]' or 'luks: {file: PATH, passphrase_file: PATH}'",
    ),
    # what the lines name
    (
        "unknown-device",
        HEAD + AB + "  t:\n    table:\n      - 0 8 zero\n      - 8 8 striped 2 4 a 0 c 0\n",
        "9: devices.t.table[1]: unknown device 'c' (known: a, b, t)",
    ),
    (
        "cycle",
        HEAD
        + AB
        + "  pool: {table: ['0 8 linear top 0']}\n  top: {table: ['0 8 linear pool 0']}\n",
        "7: devices.top.table[0]: reference cycle: pool -> top -> pool",
    ),
    (
        "self",
        HEAD + AB + "  t: {table: ['0 8 linear a 0', '8 8 linear t 0']}\n",
        "6: devices.t.table[1]: reference cycle: t -> t",
    ),
    (
        "long-cycle",
        HEAD
        + AB
        + "  x: {table: ['0 8 linear b 0', '8 8 linear y 0']}\n"  # 6
        + "  y: {table: ['0 8 linear z 0']}\n"  # 7
        + "  z: {table: ['0 8 zero', '8 8 linear x 8']}\n",  # 8
        "8: devices.z.table[1]: reference cycle: x -> y -> z -> x",
    ),
    # the regions the lines map
    (
        "past-the-end",
        HEAD + AB + "  t:\n    table:\n      - 0 8 zero\n      - 8 2048 linear a 0\n",
        "9: devices.t.table[1]: linear maps sectors 0..2048 of a, which has only 1024 sectors",
    ),
    (
        "past-the-end-offset",
        HEAD + AB + "  t: {table: ['0 8 flakey b 1020 1 1']}\n",
        "6: devices.t.table[0]: flakey maps sectors 1020..1028 of b, which has only 1024 sectors",
    ),
    (
        "past-the-end-stripe",
        HEAD + AB + "  t: {table: ['0 2048 striped 2 8 a 0 b 8']}\n",
        "6: devices.t.table[0]: striped maps sectors 8..1032 of b, which has only 1024 sectors",
    ),
    (
        "past-the-end-of-a-table",
        HEAD + AB + "  top: {table: ['0 16 linear low 0']}\n  low: {table: ['0 8 linear a 0']}\n",
        "6: devices.top.table[0]: linear maps sectors 0..16 of low, which has only 8 sectors",
    ),
    (
        "overlap-two-tables",
        HEAD
        + AB
        + "  p1: {table: ['0 512 linear a 0']}\n"
        + "  p2:\n    table:\n      - 0 8 linear b 0\n      - 8 8 linear a 504\n",
        "10: devices.p2.table[1]: linear maps sectors 504..512 of a, overlapping sectors "
        "0..512 mapped by devices.p1.table[0] (line 6); set allow_overlap: true on p1 or p2 "
        "if that is intended",
    ),
    (
        "overlap-one-table",
        HEAD + AB + "  t:\n    table:\n      - 0 8 linear a 0\n      - 8 8 linear a 0\n",
        "9: devices.t.table[1]: linear maps sectors 0..8 of a, overlapping sectors 0..8 mapped "
        "by devices.t.table[0] (line 8); set allow_overlap: true on t if that is intended",
    ),
    (
        "overlap-one-line",
        HEAD + AB + "  t: {table: ['0 256 striped 2 8 a 0 a 64']}\n",
        "6: devices.t.table[0]: striped maps sectors 0..128 and 64..192 of a, which overlap; "
        "set allow_overlap: true on t if that is intended",
    ),
    (
        "overlap-of-a-table-device",
        HEAD
        + AB
        + "  low: {table: ['0 64 linear a 0']}\n"
        + "  v1: {table: ['0 32 linear low 0']}\n"
        + "  v2: {table: ['0 8 linear low 24']}\n",
        "8: devices.v2.table[0]: linear maps sectors 24..32 of low, overlapping sectors 0..32 "
        "mapped by devices.v1.table[0] (line 7); set allow_overlap: true on v1 or v2 if that "
        "is intended",
    ),
    (
        "overlap-not-hidden-by-an-allowed-one",
        HEAD
        + AB
        + "  whole: {table: ['0 1024 linear a 0'], allow_overlap: true}\n"
        + "  p1: {table: ['0 100 linear a 10']}\n"
        + "  p2: {table: ['0 100 linear a 50']}\n",
        "8: devices.p2.table[0]: linear maps sectors 50..150 of a, overlapping sectors 10..110 "
        "mapped by devices.p1.table[0] (line 7); set allow_overlap: true on p1 or p2 if that "
        "is intended",
    ),
    (
        "delay-legs-overlapping",
        HEAD + AB + "  t: {table: ['0 8 delay a 0 0 a 4 0']}\n",
        "6: devices.t.table[0]: delay maps sectors",  # the order of delay's legs is not fixed
    ),
    # exports may name tables, and still only known devices
    (
        "export-unknown",
        "server: {listen: tcp://127.0.0.1:10809}\nexports: {e: {device: c}}\ndevices:\n"
        + AB
        + "  t: {table: ['0 8 zero']}\n",
        "2: exports.e.device: unknown device 'c' (known: a, b, t)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = str(error(path))
    assert message.startswith(f"{path}:{expected}")
    if "Exceeds" not in expected and "delay" not in expected:
        assert message == f"{path}:{expected}"


def test_error_attributes(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + AB + "  t:\n    table: |\n      0 8 zero\n      8 8 bogus\n")
    e = error(path)
    assert (e.file, e.line, e.path) == (str(path), 9, "devices.t.table[1]")
    assert e.message.startswith("unknown target 'bogus'")


def test_check_reports_table_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path, HEAD + "  a: {file: a.img, size: 512K}\n  t: {table: ['0 8 linear x 0']}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "nbdcrypt", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr == (
        f"nbdcrypt: config error: {path}:5: devices.t.table[0]: unknown device 'x' (known: a, t)\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


# --- what `check` prints ---------------------------------------------------------------------


def test_describe_tables_and_stacks(tmp_path: Path) -> None:
    path = write(tmp_path, STACKS)
    config = load_config(path)
    assert describe(config).splitlines() == [
        f"config: {path}",
        "listen:",
        "  tcp://127.0.0.1:10809",
        "tls: off (STARTTLS is refused)",
        "devices:",
        f"  a: file {tmp_path / 'a.img'}, 1.0 GiB (1073741824 bytes)  (created sparse on first "
        "start)",
        f"  b: file {tmp_path / 'b.img'}, 1.0 GiB (1073741824 bytes)  (created sparse on first "
        "start)",
        "  pool: table, 1.0 GiB (1074266112 bytes), 2 lines, does not pass inline crypto "
        "(zero in pool)",
        "    0 2097152 striped 2 128 a 0 b 0",
        "    2097152 1024 zero",
        "    stack: pool -> a, b",
        "  top: table, 500.0 KiB (512000 bytes), 1 line, does not pass inline crypto "
        "(zero in pool)",
        "    0 1000 linear pool 0",
        "    stack: top -> pool -> a, b",
        "exports:",
        "  'top': device top, 500.0 KiB (512000 bytes), read-write, multi-conn",
        "    stack: top -> pool -> a, b",
        "  'pool': device pool, 1.0 GiB (1074266112 bytes), read-only, multi-conn",
        "    stack: pool -> a, b",
    ]


def test_stack_notation(tmp_path: Path) -> None:
    text = (
        HEAD
        + AB
        + "  c: {memory: 1M}\n"
        + "  pool: {table: ['0 16 striped 2 8 a 0 b 0']}\n"
        + "  top: {table: ['0 8 linear pool 0', '8 8 linear c 0', '16 8 zero']}\n"
        + "  nothing: {table: ['0 8 zero', '8 8 error']}\n"
        + "  over: {table: ['0 8 flakey nothing 0 1 1', '8 8 linear pool 8'], "
        + "allow_overlap: true}\n"
    )
    config = load_config(write(tmp_path, text))
    assert stack(config, "a") == "a"
    assert stack(config, "pool") == "pool -> a, b"
    assert stack(config, "top") == "top -> (pool -> a, b), c"
    assert stack(config, "nothing") == "nothing"
    assert stack(config, "over") == "over -> nothing, (pool -> a, b)"
    out = describe(config)
    assert "  nothing: table, 8.0 KiB (8192 bytes), 2 lines, does not pass inline crypto " in out
    assert "  over: table, 8.0 KiB (8192 bytes), 2 lines, does not pass inline crypto " in out
    assert "(zero in nothing), allow_overlap\n" in out


def test_check_prints_tables_and_writes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, STACKS)
    out = subprocess.run(
        [sys.executable, "-m", "nbdcrypt", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "    stack: top -> pool -> a, b\n" in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_stacks_example_config(tmp_path: Path) -> None:
    path = tmp_path / "stacks.yaml"
    path.write_text((ROOT / "configs/stacks.yaml").read_text())
    config = load_config(path)
    assert any(isinstance(d, TableDeviceConfig) for d in config.devices.values())
    for address in config.server.listen:
        assert address.scheme == "unix" or address.host == "127.0.0.1"
    assert sorted(os.listdir(tmp_path)) == ["stacks.yaml"]


def yaml_blocks(doc: str) -> list[str]:
    text = (ROOT / "docs" / doc).read_text()
    return [part.split("```", 1)[0] for part in text.split("```yaml\n")[1:]]


def test_config_doc_example(tmp_path: Path) -> None:
    (block,) = [b for b in yaml_blocks("CONFIG.md") if "table: |" in b]
    config = load_config(write(tmp_path, "server: {listen: tcp://127.0.0.1}\n" + block))
    assert list(config.devices) == ["a", "b", "pool", "top", "slice"]
    assert describe(config).count("stack: top -> pool -> a, b") == 2


def test_targets_doc_examples(tmp_path: Path) -> None:
    """Each device of each example in docs/TARGETS.md, over 2 GiB disk0 and disk1."""
    examples = 0
    for block in yaml_blocks("TARGETS.md"):
        entries: list[str] = []
        comment = ""
        for line in block.splitlines(keepends=True):
            if line.startswith("#"):
                comment += line
            elif line.startswith(" "):
                entries[-1] += line
            else:
                entries.append(comment + line)
                comment = ""
        for entry in entries:
            name = next(x for x in entry.splitlines() if not x.startswith("#")).split(":")[0]
            text = "server: {listen: tcp://127.0.0.1}\n"
            text += f"exports: {{e: {{device: {name}}}}}\n"
            text += "devices:\n  disk0: {memory: 2G}\n  disk1: {memory: 2G}\n"
            text += "".join(f"  {line}" for line in entry.splitlines(keepends=True))
            config = load_config(write(tmp_path, text))
            assert isinstance(config.devices[name], TableDeviceConfig), entry
            examples += 1
    assert examples >= 11


# --- no table gives anything but a ConfigError or a checked config ----------------------------

NAMES = ["a", "a", "b", "b", "t0", "t1", "t2", "x"]
GARBAGE = ["linear", "crypt", "#", "-1", "1.5", "0x10", "", "'", '"', "\\", "|", ":", "- x"]
NUMBER = st.sampled_from([0, 1, 8, 64, 128, 512, 1000, 1024, 2048]) | st.integers(0, 4096)
HUGE = st.sampled_from([2**63, 2**64, 10**25])
SMALL = st.sampled_from([0, 8, 16, 64, 256, 512, 1024])
LENGTH = st.sampled_from([8, 16, 64, 256, 512, 1024])


@st.composite
def table_lines(draw: st.DrawFn) -> list[str]:
    """Mostly well-formed lines (so that references, sizes and overlaps get checked), with a
    garbage word, a gap, an overlap or a huge number now and then."""
    lines = []
    start = 0

    def dev() -> str:
        return draw(st.sampled_from(NAMES))

    def num() -> str:
        return str(draw(SMALL if draw(st.integers(0, 3)) else NUMBER))

    count = draw(st.integers(0, 12))
    for _ in range(count and 1 + count % 4):
        length = draw(LENGTH if draw(st.integers(0, 5)) else NUMBER | HUGE)
        target = draw(st.sampled_from(["linear", "striped", "zero", "error", "flakey", "delay"]))
        if target == "linear":
            args = [dev(), num()]
        elif target == "striped":
            count, chunk = draw(st.integers(1, 3)), draw(st.sampled_from([1, 4, 8]))
            if draw(st.integers(0, 3)):
                length = count * chunk * draw(st.integers(1, 64))
            args = [str(count), str(chunk)]
            args += [word for _ in range(count) for word in (dev(), num())]
        elif target == "flakey":
            args = [dev(), num(), str(draw(st.integers(0, 2))), str(draw(st.integers(0, 2)))]
            args += draw(st.sampled_from([[], ["1", "drop_writes"], ["1", "error_reads"]]))
        elif target == "delay":
            args = [w for _ in range(draw(st.sampled_from([1, 2, 3]))) for w in (dev(), num(), "0")]
        else:
            args = []
        words = [str(start), str(length), target, *args]
        if draw(st.integers(0, 9)) == 0:
            words[draw(st.integers(0, len(words) - 1))] = draw(
                st.sampled_from(GARBAGE) | st.text(max_size=3)
            )
        lines.append(" ".join(words))
        start += length + draw(st.sampled_from([0] * 12 + [1, -1]))
    return lines


def yaml_table(lines: list[str], form: str) -> str:
    if form == "list":
        return "".join(f"      - {line!r}\n" for line in lines) or "      []\n"
    if form == "quoted":
        return "".join(f'      - "{line}"\n' for line in lines) or "      []\n"
    return "      |\n" + "".join(f"        {line}\n" for line in lines)


@pytest.fixture(scope="module")
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tables=st.lists(
        st.tuples(table_lines(), st.sampled_from(["list", "quoted", "block"]), st.booleans()),
        min_size=1,
        max_size=3,
    ),
    export=st.sampled_from(NAMES),
)
def test_fuzz_tables(
    scratch_dir: Path, tables: list[tuple[list[str], str, bool]], export: str
) -> None:
    text = "server: {listen: tcp://127.0.0.1:10809}\n"
    text += f"exports: {{e: {{device: {export}}}}}\ndevices:\n"
    text += "  a: {memory: 512K}\n  b: {memory: 1M}\n"
    for i, (lines, form, allow) in enumerate(tables):
        text += f"  t{i}:\n    allow_overlap: {str(allow).lower()}\n    table:\n"
        text += yaml_table(lines, form)
    path = write(scratch_dir, text)
    try:
        config = load_config(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}:") and "\n" not in str(e)
        assert e.line is not None and 1 <= e.line <= len(text.splitlines()) + 1
        return
    finally:
        assert os.listdir(scratch_dir) == ["c.yaml"]
    seen: set[str] = set()
    for name, device in config.devices.items():
        if isinstance(device, TableDeviceConfig):
            assert device.size == table_size(device.lines)
            for line in device.lines:
                for ref in line.refs():
                    assert ref.device in seen
                    assert ref.offset + ref.length <= config.devices[ref.device].size
        else:
            assert isinstance(device, MemoryDeviceConfig)
        seen.add(name)
    describe(config)
