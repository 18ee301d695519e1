"""Crash safety: SIGKILL in the middle of a multi-client write load, restart, check durability.

Several clients (libnbd handles, one thread each, each owning its own blocks) write versioned
blocks at random, some with FUA, and flush now and then. At a random moment the server is killed
with SIGKILL and started again on the same files. Then every block must hold a whole version
(never a torn or foreign one), no older than the last version that was durable when the server
died (acknowledged with FUA, or acknowledged before a FLUSH that completed) and no newer than the
last one sent. On a plain file and on an encrypted striped stack with 2-slot inline engines,
repeated at several seeded random points.
"""

from __future__ import annotations

import random
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest
from conftest import RunningServer, launch_server

BLOCK = 4096
CLIENTS = 4
BLOCKS_PER_CLIENT = 64
ROUNDS = 3
MAGIC = b"NBDCRASH"

PLAIN = """\
devices:
  disk: {file: disk.img, size: 8M}
exports:
  vol: {device: disk}
"""
ENGINE = "{keyslots: 2, modes: {aes-256-xts: [4096]}, max_dun_bytes: 8}"
ENCRYPTED = f"""\
keys:
  k: {{mode: aes-256-xts, data_unit_size: 4096, source: {{file: k.key, create: true}}}}
devices:
  a: {{file: a.img, size: 4M, inline_crypto: {ENGINE}}}
  b: {{file: b.img, size: 4M, inline_crypto: {ENGINE}}}
  pool: {{table: ["0 16384 striped 2 16 a 0 b 0"]}}
exports:
  vol: {{device: pool, key: k}}
"""


def block_of(client: int, index: int, version: int) -> bytes:
    """Version `version` of a client's block: a header naming it, then filler derived from it."""
    head = MAGIC + struct.pack(">III", client, index, version)
    filler = random.Random(hash((client, index, version))).randbytes(BLOCK - len(head))
    return head + filler


@dataclass
class History:
    """What one client knows about its blocks."""

    sent: dict[int, int] = field(default_factory=dict)  # block -> highest version sent
    acked: dict[int, int] = field(default_factory=dict)  # block -> highest version acknowledged
    durable: dict[int, int] = field(default_factory=dict)  # block -> highest version durable


def client_loop(uri: str, client: int, seed: int, history: History, stop: threading.Event) -> None:
    rng = random.Random(seed * 1000 + client)
    h = nbd.NBD()
    h.connect_uri(uri)
    version = max(history.sent.values(), default=0)  # versions go on rising across rounds
    try:
        while not stop.is_set():
            if rng.random() < 0.1:
                pending = dict(history.acked)  # acknowledged before this flush is sent
                h.flush()
                for index, v in pending.items():
                    history.durable[index] = max(history.durable.get(index, 0), v)
                continue
            index = rng.randrange(BLOCKS_PER_CLIENT)
            version += 1
            fua = rng.random() < 0.2
            history.sent[index] = version
            offset = (client * BLOCKS_PER_CLIENT + index) * BLOCK
            h.pwrite(block_of(client, index, version), offset, nbd.CMD_FLAG_FUA if fua else 0)
            history.acked[index] = version
            if fua:
                history.durable[index] = version
    except nbd.Error:
        pass  # the server died under us: that is the test
    finally:
        del h  # libnbd closes the socket with the handle


def check_after_restart(server: RunningServer, histories: list[History]) -> int:
    """Every block holds a whole version within [durable, sent]; returns blocks checked."""
    h = nbd.NBD()
    h.connect_uri(server.uri("vol"))
    checked = 0
    try:
        for client, history in enumerate(histories):
            for index in range(BLOCKS_PER_CLIENT):
                data = h.pread(BLOCK, (client * BLOCKS_PER_CLIENT + index) * BLOCK)
                durable, sent = history.durable.get(index, 0), history.sent.get(index, 0)
                if sent == 0 and data == bytes(BLOCK):
                    continue  # never written: still zeroes
                if data == bytes(BLOCK) or data[: len(MAGIC)] != MAGIC:
                    assert durable == 0, f"client {client} block {index}: lost version {durable}"
                    assert data == bytes(BLOCK), f"client {client} block {index}: garbage"
                    continue
                owner, at, version = struct.unpack(">III", data[len(MAGIC) : len(MAGIC) + 12])
                assert (owner, at) == (client, index), f"block {client}/{index} holds {owner}/{at}"
                assert data == block_of(client, index, version), f"{client}/{index}: torn"
                assert durable <= version <= sent, (
                    f"client {client} block {index}: version {version}, "
                    f"durable {durable}, sent {sent}"
                )
                checked += 1
    finally:
        h.shutdown()
    return checked


@pytest.mark.parametrize("config", [PLAIN, ENCRYPTED], ids=["plain", "encrypted-striped"])
def test_sigkill_mid_load_keeps_every_durable_write(tmp_path: Path, config: str) -> None:
    rng = random.Random(20261122)
    histories = [History() for _ in range(CLIENTS)]
    durable_total = 0
    for round_ in range(ROUNDS):
        server = launch_server(tmp_path, config)
        try:
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=client_loop,
                    args=(server.uri("vol"), c, round_, histories[c], stop),
                    daemon=True,
                )
                for c in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.5))  # a random point in the load
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(30)
            stop.set()
            for t in threads:
                t.join(30)
                assert not t.is_alive(), "a client did not notice the server die"
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(30)
        restarted = launch_server(tmp_path, config)
        try:
            assert check_after_restart(restarted, histories) > 0
            durable_total += sum(len(h.durable) for h in histories)
        finally:
            assert restarted.stop() == 0, restarted.log[-3000:]
    assert durable_total > 0, "the load never made anything durable: the test proves nothing"
