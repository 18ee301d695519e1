"""libnbd's tools against nbdcrypt: nbdinfo (flags, lists, maps) and nbdcopy (data round trips).

What a real client sees is the oracle: nbdinfo prints what the server advertised, nbdcopy moves
data with multi-conn and structured replies, and the backing file is read directly afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients.util import (
    DESCRIPTIONS,
    EXPORT_SIZE,
    STANDARD_CONFIG,
    MiB,
    handle,
    merge_extents,
    nbdinfo_json,
    pattern,
    random_bytes,
    read_file_range,
    server_fixture,
    sha256_file,
    workdir,
)
from conftest import RunningServer, StartServer, require_tool, run

HOLE_ZERO = 3  # base:allocation: NBD_STATE_HOLE | NBD_STATE_ZERO, printed as "hole,zero"
DATA = 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the read-mostly tests of this module (only one writes, at 60 MiB)."""
    require_tool("nbdinfo")
    with server_fixture(tmp_path_factory, STANDARD_CONFIG, "libnbd") as s:
        yield s


def only_export(info: Any) -> dict[str, Any]:
    exports = info["exports"]
    assert len(exports) == 1, exports
    export: dict[str, Any] = exports[0]
    return export


# ---------------------------------------------------------------- nbdinfo


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdinfo_json_plain_export(server: RunningServer, tcp: bool) -> None:
    info = nbdinfo_json(server.uri("plain", tcp=tcp))
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    assert info["structured"] is True
    e = only_export(info)
    assert e["export-name"] == "plain"
    assert e["description"] == "a plain file"
    assert e["export-size"] == EXPORT_SIZE
    assert "base:allocation" in e["contexts"]
    expected = {
        "is_read_only": False,
        "can_flush": True,
        "can_fua": True,
        "can_trim": True,
        "can_zero": True,
        "can_fast_zero": True,
        "can_df": True,
        "can_cache": True,
        "can_multi_conn": True,
    }
    assert {k: e.get(k) for k in expected} == expected
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (
        1,
        4096,
        32 * MiB,
    )


def test_nbdinfo_json_readonly_export(server: RunningServer) -> None:
    e = only_export(nbdinfo_json(server.uri("ro")))
    assert e["export-name"] == "ro"
    assert e["is_read_only"] is True
    assert e["description"] == DESCRIPTIONS["ro"]
    assert e["export-size"] == EXPORT_SIZE
    # reads still advertise what they can do
    assert e["can_df"] is True
    assert e["can_cache"] is True


def test_nbdinfo_json_memory_export(server: RunningServer) -> None:
    e = only_export(nbdinfo_json(server.uri("mem")))
    assert e["export-size"] == EXPORT_SIZE
    assert e["is_read_only"] is False
    assert e["can_multi_conn"] is True
    assert e["can_flush"] is True
    assert e["can_zero"] is True
    assert e["description"] == "in memory"


def test_nbdinfo_without_structured_replies_has_no_df(server: RunningServer) -> None:
    """SEND_DF is advertised only when structured replies were negotiated (spec, bit 7)."""
    with handle(server.uri("plain"), structured=False, meta=False) as h:
        assert h.get_structured_replies_negotiated() is False
        assert h.can_df() is False
        assert h.can_flush() is True
    with handle(server.uri("plain")) as h:
        assert h.get_structured_replies_negotiated() is True
        assert h.can_df() is True


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdinfo_list_shows_every_export_with_description(server: RunningServer, tcp: bool) -> None:
    info = nbdinfo_json("--list", server.uri("", tcp=tcp))
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == set(DESCRIPTIONS), exports.keys()
    for name, desc in DESCRIPTIONS.items():
        assert exports[name]["description"] == desc, exports[name]
        assert exports[name]["export-size"] == EXPORT_SIZE
    assert exports["ro"]["is_read_only"] is True
    assert exports["plain"]["is_read_only"] is False

    text = run(["nbdinfo", "--list", server.uri("", tcp=tcp)], timeout=60).stdout
    for name, desc in DESCRIPTIONS.items():
        assert f'export="{name}":' in text, text
        assert f"description: {desc}" in text, text


def test_default_export_is_plain(server: RunningServer) -> None:
    e = only_export(nbdinfo_json(server.uri("")))
    assert e["description"] == "a plain file"
    assert e["export-size"] == EXPORT_SIZE
    assert e["is_read_only"] is False
    # and it is the same device: a write through the default export shows on "plain"
    data = pattern(0xDEF, 64 * 1024)
    with handle(server.uri("")) as h:
        h.pwrite(data, 60 * MiB)
        h.flush()
    with handle(server.uri("plain")) as h:
        assert bytes(h.pread(len(data), 60 * MiB)) == data


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdinfo_unknown_export_fails_clearly(server: RunningServer, tcp: bool) -> None:
    proc = run(["nbdinfo", server.uri("no-such-export", tcp=tcp)], check=False, timeout=60)
    assert proc.returncode != 0, proc.stdout
    # nbdinfo reports the server's NBD_REP_ERR_UNKNOWN to opt_go and names the export
    assert "no-such-export" in proc.stderr, proc.stderr
    assert "opt_go" in proc.stderr or "export" in proc.stderr, proc.stderr
    # the server is still fine
    assert only_export(nbdinfo_json(server.uri("plain", tcp=tcp)))["export-size"] == EXPORT_SIZE


def test_nbdinfo_map_of_never_written_file_is_one_hole(server: RunningServer) -> None:
    out = run(["nbdinfo", "--map", server.uri("sparse")], timeout=60).stdout
    assert out.split() == ["0", str(EXPORT_SIZE), "3", "hole,zero"], out


def map_json(uri: str) -> list[tuple[int, int, int]]:
    raw = nbdinfo_json("--map", uri)
    extents = [(int(x["offset"]), int(x["length"]), int(x["type"])) for x in raw]
    for x in raw:
        assert x["description"] == {0: "data", 3: "hole,zero", 2: "zero", 1: "hole"}[x["type"]]
    return extents


def test_nbdinfo_map_reports_data_written_through_the_server(
    start_server: StartServer,
) -> None:
    require_tool("nbdinfo")
    server = start_server(STANDARD_CONFIG)
    writes = [(4 * MiB, 1 * MiB), (16 * MiB, 64 * 1024), (40 * MiB, 2 * MiB)]
    with handle(server.uri("plain")) as h:
        for i, (off, length) in enumerate(writes):
            h.pwrite(pattern(i + 1, length), off)
        h.flush()

    extents = map_json(server.uri("plain"))
    assert extents[0][0] == 0
    assert sum(x[1] for x in extents) == EXPORT_SIZE
    expected = []
    pos = 0
    for off, length in writes:
        expected.append((pos, off - pos, HOLE_ZERO))
        expected.append((off, length, DATA))
        pos = off + length
    expected.append((pos, EXPORT_SIZE - pos, HOLE_ZERO))
    assert merge_extents(extents) == expected

    # the text form and --totals agree
    text = run(["nbdinfo", "--map", server.uri("plain", tcp=True)], timeout=60).stdout
    rows = [line.split() for line in text.splitlines() if line.strip()]
    text_extents = [(int(r[0]), int(r[1]), int(r[2])) for r in rows]
    assert merge_extents(text_extents) == expected
    for r in rows:
        assert r[3] == ("data" if int(r[2]) == 0 else "hole,zero"), r
    totals = run(["nbdinfo", "--map", "--totals", server.uri("plain")], timeout=60).stdout
    per_type = {int(r.split()[2]): int(r.split()[0]) for r in totals.splitlines() if r.strip()}
    data_bytes = sum(length for _, length in writes)
    assert per_type == {DATA: data_bytes, HOLE_ZERO: EXPORT_SIZE - data_bytes}, totals

    # the same regions are data in the backing file itself
    backing = workdir(server) / "disk0.img"
    for i, (off, length) in enumerate(writes):
        assert read_file_range(backing, off, length) == pattern(i + 1, length)


def test_nbdinfo_map_of_memory_export(start_server: StartServer) -> None:
    require_tool("nbdinfo")
    server = start_server(STANDARD_CONFIG)
    with handle(server.uri("mem")) as h:
        h.pwrite(pattern(1, 1 * MiB), 4 * MiB)
        h.pwrite(pattern(2, 4096), 9 * MiB)
    merged = merge_extents(map_json(server.uri("mem", tcp=True)))
    assert merged[:2] == [(0, 4 * MiB, HOLE_ZERO), (4 * MiB, 1 * MiB, DATA)], merged
    # the 4 KiB write lies in one data extent of the device's own granularity (at most 1 MiB)
    small = [x for x in merged if x[2] == DATA and x[0] <= 9 * MiB < x[0] + x[1]]
    assert len(small) == 1 and small[0][1] <= 1 * MiB, merged
    assert [x[2] for x in merged] == [HOLE_ZERO, DATA, HOLE_ZERO, DATA, HOLE_ZERO], merged


# ---------------------------------------------------------------- nbdcopy

COPY_CONFIG = """\
devices:
  disk0: {file: disk0.img, size: 32M}
  mem0: {memory: 16M}
exports:
  copy: {device: disk0, description: "copy target", default: true}
  mem: {device: mem0, multi_conn: true}
"""


def copy_roundtrip(
    tmp_path: Path, src: Path, uri_in: str, uri_out: str, *extra: str
) -> tuple[Path, str]:
    out = tmp_path / "out.bin"
    out.unlink(missing_ok=True)
    run(["nbdcopy", *extra, str(src), uri_in], timeout=120)
    run(["nbdcopy", *extra, uri_out, str(out)], timeout=120)
    return out, sha256_file(out)


def write_random_file(path: Path, size: int, seed: int) -> str:
    chunk = 4 * MiB
    with path.open("wb") as f:
        for i in range(size // chunk):
            f.write(random_bytes(chunk, seed * 1000 + i))
    return sha256_file(path)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdcopy_roundtrip_32m_file(start_server: StartServer, tmp_path: Path, tcp: bool) -> None:
    require_tool("nbdcopy")
    server = start_server(COPY_CONFIG)
    src = tmp_path / "in.bin"
    digest = write_random_file(src, 32 * MiB, seed=1)
    out, out_digest = copy_roundtrip(
        tmp_path, src, server.uri("copy", tcp=tcp), server.uri("copy", tcp=tcp)
    )
    assert out.stat().st_size == 32 * MiB
    assert out_digest == digest
    # the backing file holds exactly the input (no encryption on this export)
    assert sha256_file(workdir(server) / "disk0.img") == digest


def test_nbdcopy_multi_conn_roundtrip(start_server: StartServer, tmp_path: Path) -> None:
    require_tool("nbdcopy")
    server = start_server(COPY_CONFIG)
    src = tmp_path / "in.bin"
    digest = write_random_file(src, 32 * MiB, seed=2)
    extra = ("--connections=4", "--requests=16", "--flush")
    _, out_digest = copy_roundtrip(
        tmp_path, src, server.uri("copy", tcp=True), server.uri("copy"), *extra
    )
    assert out_digest == digest
    assert sha256_file(workdir(server) / "disk0.img") == digest
    # once more over the other transport, overwriting with different data
    digest2 = write_random_file(src, 32 * MiB, seed=3)
    _, out_digest2 = copy_roundtrip(
        tmp_path, src, server.uri("copy"), server.uri("copy", tcp=True), *extra
    )
    assert out_digest2 == digest2
    assert sha256_file(workdir(server) / "disk0.img") == digest2


def test_nbdcopy_sparse_source_keeps_zeros(start_server: StartServer, tmp_path: Path) -> None:
    """A source with holes over an export full of data: nbdcopy zeroes the holes (it uses
    WRITE_ZEROES / fast zero where it can); every byte must still come out right."""
    require_tool("nbdcopy")
    server = start_server(COPY_CONFIG)
    full = tmp_path / "full.bin"
    write_random_file(full, 32 * MiB, seed=4)
    run(["nbdcopy", str(full), server.uri("copy")], timeout=120)

    sparse = tmp_path / "sparse.bin"
    with sparse.open("wb") as f:
        f.truncate(32 * MiB)
        f.seek(8 * MiB)
        f.write(random_bytes(1 * MiB, 5))
        f.seek(30 * MiB)
        f.write(random_bytes(512 * 1024, 6))
    digest = sha256_file(sparse)
    _, out_digest = copy_roundtrip(tmp_path, sparse, server.uri("copy"), server.uri("copy"))
    assert out_digest == digest
    assert sha256_file(workdir(server) / "disk0.img") == digest


def test_nbdcopy_memory_export_roundtrip(start_server: StartServer, tmp_path: Path) -> None:
    require_tool("nbdcopy")
    server = start_server(COPY_CONFIG)
    src = tmp_path / "in.bin"
    digest = write_random_file(src, 16 * MiB, seed=7)
    _, out_digest = copy_roundtrip(
        tmp_path, src, server.uri("mem"), server.uri("mem", tcp=True), "--connections=2"
    )
    assert out_digest == digest
    # a later connection still sees the data (the memory lives as long as the server)
    with handle(server.uri("mem", tcp=True)) as h:
        assert bytes(h.pread(4 * MiB, 12 * MiB)) == read_file_range(src, 12 * MiB, 4 * MiB)


def test_nbdcopy_smaller_source_leaves_the_rest(start_server: StartServer, tmp_path: Path) -> None:
    """nbdcopy of a source smaller than the export writes only the source's length."""
    require_tool("nbdcopy")
    server = start_server(COPY_CONFIG)
    tail = pattern(0x7A1, 1 * MiB)
    with handle(server.uri("copy")) as h:
        h.pwrite(tail, 24 * MiB)
        h.flush()
    src = tmp_path / "in.bin"
    write_random_file(src, 8 * MiB, seed=8)
    run(["nbdcopy", str(src), server.uri("copy")], timeout=120)
    backing = workdir(server) / "disk0.img"
    assert read_file_range(backing, 0, 8 * MiB) == src.read_bytes()
    assert read_file_range(backing, 24 * MiB, 1 * MiB) == tail
