"""Sealed writes: a connection thread receives a large encrypted write, encrypts it in place and
writes it to the backing file itself (docs/ARCHITECTURE.md, "Sealed writes").

What is checked: the file holds exactly blk-crypto's ciphertext (an independent per-unit
AES-XTS from `cryptography`) through an engine with keyslots, one without, and the software
fallback, and dm-crypt's through a crypt table, with both unit sizes; the close lines count
the writes sealed; the keyslot a sealed write held is given back whatever became of the write
(landed or refused by the file), and a client stalled inside a payload or reading no replies
holds none, which a one-slot engine shared by two keys would otherwise show as a hang; a
suspended table holds
sealed writes; and what must take the ordinary path does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbd
import pytest
from clients import rawnbd as rn
from clients.util import (
    expect_nbd_error,
    handle,
    pattern,
    random_bytes,
    read_file_range,
    workdir,
    xts,
)
from conftest import ROOT, RunningServer, StartServer, require_tool

MiB = 1 << 20

CONFIG = """\
keys:
  a: {mode: aes-256-xts, data_unit_size: 4096, source: {file: keys/a.key, create: true}}
  b: {mode: aes-256-xts, data_unit_size: 512, source: {file: keys/b.key, create: true}}
  c: {mode: aes-128-cbc-essiv, data_unit_size: 4096, source: {file: keys/c.key, create: true}}
devices:
  slots:
    file: slots.img
    size: 64M
    inline_crypto:
      keyslots: 1
      modes: {aes-256-xts: [512, 4096], aes-128-cbc-essiv: [4096]}
      max_dun_bytes: 8
  raw:
    file: raw.img
    size: 64M
    inline_crypto: {keyslots: 0, modes: {aes-256-xts: [512]}, max_dun_bytes: 8}
  soft: {file: soft.img, size: 64M}
  mapped:
    table:
      - 0 131072 linear slots 0
exports:
  slots-a: {device: slots, key: a, multi_conn: true}
  slots-b: {device: slots, key: b}
  slots-c: {device: slots, key: c}
  raw-b: {device: raw, key: b, multi_conn: true}
  soft-a: {device: soft, key: a, multi_conn: true}
  mapped-a: {device: mapped, key: a}
"""


def close_lines(log: str, export: str) -> list[str]:
    return [line for line in log.splitlines() if f"closed export '{export}'" in line]


def sealed(server: RunningServer, export: str) -> int:
    found = (re.search(r", (\d+) sealed", line) for line in close_lines(server.log, export))
    return sum(int(m.group(1)) for m in found if m)


def within(seconds: float, *works: Callable[[], None]) -> None:
    """Run `works` at once, each on a thread, and fail, not hang, if they are not done in
    `seconds` (a keyslot never given back leaves the next write that needs it waiting
    forever); the first error of any is raised here."""
    pool = ThreadPoolExecutor(len(works))
    try:
        running = [pool.submit(work) for work in works]
        deadline = time.monotonic() + seconds
        for future in running:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"not done within {seconds}s: is a keyslot held?") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def through_key_b(server: RunningServer, tag: int, offset: int) -> None:
    """Write 1 MiB through key b (the one slot's other key) and read it back, within 60 s."""

    def work() -> None:
        with handle(server.uri("slots-b")) as h:
            h.pwrite(pattern(tag, MiB), offset)
            assert h.pread(MiB, offset) == pattern(tag, MiB)

    within(60, work)


def key(server: RunningServer, name: str) -> bytes:
    return (workdir(server) / "keys" / f"{name}.key").read_bytes()


def on_disk(server: RunningServer, image: str, offset: int, length: int) -> bytes:
    return read_file_range(workdir(server) / image, offset, length)


# export -> (its backing file, its key, the key's data unit size)
ENGINES = {
    "slots-a": ("slots.img", "a", 4096),  # an engine with keyslots
    "raw-b": ("raw.img", "b", 512),  # one without, 512-byte units (the C XTS of small units)
    "soft-a": ("soft.img", "a", 4096),  # no engine: the software fallback
}


@pytest.mark.parametrize("export", ENGINES)
def test_nbdcopy_writes_are_sealed_and_the_file_holds_blk_crypto_ciphertext(
    tmp_path: Path, start_server: StartServer, export: str
) -> None:
    """nbdcopy (256 KiB writes on two connections) onto an encrypted export: the file holds
    AES-XTS of every unit at DUN = offset / unit, nbdcopy reads the plaintext back, and the
    close lines count the writes sealed."""
    src = tmp_path / "src.img"
    plain = random_bytes(32 * MiB, 7)
    src.write_bytes(plain)
    server = start_server(CONFIG)
    nbdcopy = require_tool("nbdcopy")
    subprocess.run([nbdcopy, str(src), server.uri(export)], check=True, timeout=120)
    back = subprocess.run(
        [nbdcopy, server.uri(export), "-"], check=True, timeout=120, capture_output=True
    ).stdout
    assert back[: len(plain)] == plain
    assert server.stop() == 0
    image, key_name, unit = ENGINES[export]
    cipher = on_disk(server, image, 0, len(plain))
    assert cipher == xts(key(server, key_name), unit, 0, plain, encrypt=True)
    assert sealed(server, export) >= 32 * MiB // (256 * 1024) // 2


def test_without_the_c_module_nothing_is_sealed_and_the_bytes_are_the_same(
    tmp_path: Path, start_server: StartServer
) -> None:
    """An install without the cipher's C module encrypts every write the ordinary way: the
    same ciphertext, no write sealed."""
    blocker = tmp_path / "no_c_module"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['nbdcrypt.crypto._units'] = None  # as if never built\n"
    )
    server = start_server(CONFIG, env={"PYTHONPATH": str(blocker)})
    data = random_bytes(4 * MiB, 8)
    with handle(server.uri("slots-a")) as h:
        for at in range(0, len(data), MiB):
            h.pwrite(data[at : at + MiB], at)
    assert server.stop() == 0
    assert on_disk(server, "slots.img", 0, len(data)) == xts(
        key(server, "a"), 4096, 0, data, encrypt=True
    )
    assert close_lines(server.log, "slots-a") and sealed(server, "slots-a") == 0


def test_what_is_not_sealed(start_server: StartServer) -> None:
    """FUA writes, small writes, AES-CBC-ESSIV and writes through a mapped device take the
    ordinary path (no write sealed) and read back all the same."""
    server = start_server(CONFIG)
    with handle(server.uri("slots-a")) as h:
        h.pwrite(pattern(1, MiB), 0, nbd.CMD_FLAG_FUA)
        for i in range(4):
            h.pwrite(pattern(2 + i, 4096), MiB + i * 4096)
        assert h.pread(MiB, 0) == pattern(1, MiB)
    with handle(server.uri("slots-c")) as h:
        h.pwrite(pattern(6, MiB), 8 * MiB)
        assert h.pread(MiB, 8 * MiB) == pattern(6, MiB)
    with handle(server.uri("mapped-a")) as h:
        h.pwrite(pattern(7, MiB), 16 * MiB)
        assert h.pread(MiB, 16 * MiB) == pattern(7, MiB)
    assert server.stop() == 0
    for export in ("slots-a", "slots-c", "mapped-a"):
        assert close_lines(server.log, export) and sealed(server, export) == 0, export
    assert on_disk(server, "slots.img", 16 * MiB, MiB) == xts(
        key(server, "a"), 4096, 16 * MiB, pattern(7, MiB), encrypt=True
    )


def test_the_keyslot_comes_back_after_each_sealed_write(start_server: StartServer) -> None:
    """One keyslot, two keys: writes alternate between them on two connections held open,
    so each needs the slot the other's sealed write held (a slot never given back would
    leave the next write waiting forever). Both read back; both were sealed."""
    server = start_server(CONFIG)

    def alternate() -> None:
        with handle(server.uri("slots-a")) as ha, handle(server.uri("slots-b")) as hb:
            for i in range(6):
                ha.pwrite(pattern(10 + i, MiB), i * MiB)
                hb.pwrite(pattern(20 + i, MiB), (32 + i) * MiB)
            for i in range(6):
                assert ha.pread(MiB, i * MiB) == pattern(10 + i, MiB)
                assert hb.pread(MiB, (32 + i) * MiB) == pattern(20 + i, MiB)

    within(60, alternate)
    assert server.stop() == 0
    assert sealed(server, "slots-a") >= 5 and sealed(server, "slots-b") >= 5


def test_two_keys_writing_at_once_on_one_slot(start_server: StartServer) -> None:
    """Two clients, two keys, one keyslot, writing at the same time: a sealed write whose
    slot is taken by the other key's goes the ordinary way (it waits in the queue) with the
    payload it received. Every write of both lands, under its own key, none hangs."""
    server = start_server(CONFIG)
    writes = 24

    def writer(export: str, base: int) -> Callable[[], None]:
        def work() -> None:
            with handle(server.uri(export)) as h:
                h.pwrite(pattern(base, MiB), base * MiB, nbd.CMD_FLAG_FUA)
                for i in range(1, writes):
                    h.pwrite(pattern(base + i, MiB), (base + i) * MiB)

        return work

    within(120, writer("slots-a", 0), writer("slots-b", 32))
    with handle(server.uri("slots-a")) as ha, handle(server.uri("slots-b")) as hb:
        for i in range(writes):
            assert ha.pread(MiB, i * MiB) == pattern(i, MiB)
            assert hb.pread(MiB, (32 + i) * MiB) == pattern(32 + i, MiB)
    assert server.stop() == 0
    plain = b"".join(pattern(i, MiB) for i in range(writes))
    assert on_disk(server, "slots.img", 0, len(plain)) == xts(
        key(server, "a"), 4096, 0, plain, encrypt=True
    )
    assert sealed(server, "slots-a") + sealed(server, "slots-b") > 0


def test_a_sealed_write_the_file_refuses_gets_its_error_and_gives_the_slot_back(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Under a file size limit of 8 MiB (RLIMIT_FSIZE) a sealed write past it fails: the
    client gets ENOSPC, the next write on that connection lands, and the one slot is free
    for the other key."""
    for image in ("slots.img", "raw.img", "soft.img"):  # made here: the limit forbids it
        (tmp_path / image).write_bytes(b"")
        os.truncate(tmp_path / image, 64 * MiB)
    limit = tmp_path / "fsize_limit"
    limit.mkdir()
    (limit / "sitecustomize.py").write_text(
        "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))\n"
    )
    server = start_server(CONFIG, env={"PYTHONPATH": str(limit)})
    with handle(server.uri("slots-a")) as h:
        h.pwrite(
            pattern(0, MiB), 0, nbd.CMD_FLAG_FUA
        )  # after it, a large write's header comes alone
        expect_nbd_error(lambda: h.pwrite(pattern(1, MiB), 16 * MiB), errno.ENOSPC)
        h.pwrite(pattern(2, MiB), 2 * MiB)
        assert h.pread(MiB, 2 * MiB) == pattern(2, MiB)
    through_key_b(server, 3, 3 * MiB)
    assert server.stop() == 0
    assert sealed(server, "slots-a") == 2  # the refused one and the one after it


def test_a_client_stalled_or_gone_mid_payload_holds_no_keyslot(start_server: StartServer) -> None:
    """A client sends a 1 MiB write's header and half its payload and stalls: the sealed
    write that took the keyslot as its payload began gives it back once the client has been
    silent for 10 ms (the bytes are decrypted back and the rest received the ordinary way),
    so the other key's writes (one slot) go on meanwhile, and after the client is gone."""
    server = start_server(CONFIG)
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_go("slots-a")
        # A large FUA write (never sealed): after it the server reads the next header alone,
        # so the next large write is sealed from its first payload byte.
        c.request(rn.CMD_WRITE, 0, MiB, flags=nbd.CMD_FLAG_FUA, data=pattern(5, MiB))
        assert c.recv_reply().errno == 0
        c.request(rn.CMD_WRITE, 4 * MiB, MiB, data=pattern(6, MiB)[: MiB // 2])
        time.sleep(0.2)  # the server is in the payload
        through_key_b(server, 7, 8 * MiB)
    through_key_b(server, 8, 9 * MiB)
    assert server.stop() == 0
    (line,) = close_lines(server.log, "slots-a")
    assert "1 requests" in line and sealed(server, "slots-a") == 0, line  # the half one: no


def test_a_client_that_reads_no_replies_holds_no_keyslot(start_server: StartServer) -> None:
    """A client pipelines 64 KiB writes and never reads a reply: once the replies fill its
    socket, its connection thread waits to send one, and it gives the keyslot back before it
    waits, so the other key's writes (one slot) go on."""
    server = start_server(CONFIG)
    size = 64 * 1024
    flooder = rn.RawNBD.unix(server.socket_path, timeout=300)
    flooder.start()
    flooder.opt_go("slots-a")
    data = pattern(3, size)
    sent = [0]

    def flood() -> None:
        with contextlib.suppress(OSError, rn.ClosedError):  # shut down under it at the end
            # the server's unix send buffer (8 MiB) fills after ~10k replies
            for i in range(40_000):
                flooder.request(rn.CMD_WRITE, (i % 512) * size, size, data=data)
                sent[0] += 1

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        last, deadline = -1, time.monotonic() + 120
        while sent[0] != last and time.monotonic() < deadline:  # until the server stops reading
            last = sent[0]
            thread.join(1)
        assert thread.is_alive(), "the server took every write: its replies never filled up"
        through_key_b(server, 9, 40 * MiB)
    finally:
        flooder.sock.shutdown(socket.SHUT_RDWR)  # wakes the flood blocked in its send
        flooder.close()
        thread.join(30)
    assert server.stop() == 0
    assert sealed(server, "slots-a") > 0


# Through a mapped device: dm-crypt's crypt target -------------------------------------------------

KEY_HEX = bytes(range(64)).hex()
CRYPT_CONFIG = f"""\
devices:
  f: {{file: f.img, size: 64M}}
  g: {{file: g.img, size: 64M}}
  c512: {{table: ["0 131072 crypt aes-xts-plain64 {KEY_HEX} 0 f 0"]}}
  c4k:
    table: ["0 131072 crypt aes-xts-plain64 {KEY_HEX} 0 g 0 2 sector_size:4096 iv_large_sectors"]
exports:
  crypt512: {{device: c512, multi_conn: true}}
  crypt4k: {{device: c4k, multi_conn: true}}
"""


@pytest.mark.parametrize(
    ("export", "image", "sector"), [("crypt512", "f.img", 512), ("crypt4k", "g.img", 4096)]
)
def test_crypt_table_writes_are_sealed_and_equal_dm_crypt(
    tmp_path: Path, start_server: StartServer, export: str, image: str, sector: int
) -> None:
    """nbdcopy onto a crypt table over a file: sealed, and the file holds aes-xts-plain64
    exactly (IV = 512-byte sector, or with iv_large_sectors the 4096-byte sector)."""
    src = tmp_path / "src.img"
    plain = random_bytes(16 * MiB, 9)
    src.write_bytes(plain)
    server = start_server(CRYPT_CONFIG)
    subprocess.run([require_tool("nbdcopy"), str(src), server.uri(export)], check=True, timeout=120)
    assert server.stop() == 0
    assert on_disk(server, image, 0, len(plain)) == xts(
        bytes(range(64)), sector, 0, plain, encrypt=True
    )
    assert sealed(server, export) >= 16 * MiB // (256 * 1024) // 2


def test_a_suspended_crypt_table_holds_sealed_writes_until_resumed(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A client writes 1 MiB at a time (sealed) while the table is suspended and resumed:
    `ctl suspend` returns with none of them inside, none completes while suspended, and all
    land after the resume."""
    control = tmp_path / "control.sock"
    server = start_server(CRYPT_CONFIG, "--control", str(control))
    done: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with handle(server.uri("crypt512")) as h:
            h.pwrite(pattern(0, MiB), 0, nbd.CMD_FLAG_FUA)  # after it each header comes alone
            for i in range(1, 48):
                if stop.is_set():
                    return
                h.pwrite(pattern(i, MiB), i * MiB)
                done.append(i)

    def ctl(*args: str) -> None:
        cmd = [sys.executable, "-m", "nbdcrypt", "ctl", "-s", str(control), *args]
        subprocess.run(cmd, check=True, timeout=60, cwd=ROOT, capture_output=True)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(done) < 4:
            assert time.monotonic() < deadline and thread.is_alive(), done
            time.sleep(0.01)
        ctl("suspend", "c512")
        held = len(done)
        time.sleep(0.5)
        assert len(done) == held, "a write completed on a suspended device"
        ctl("resume", "c512")
        thread.join(60)
        assert not thread.is_alive() and done[-1] == 47, done
    finally:
        stop.set()
        thread.join(60)
    assert server.stop() == 0
    plain = b"".join(pattern(i, MiB) for i in range(48))
    assert on_disk(server, "f.img", 0, 48 * MiB) == xts(
        bytes(range(64)), 512, 0, plain, encrypt=True
    )
    assert sealed(server, "crypt512") > 20
