"""The issue's CI run: 32 verifying clients for about a minute against an encrypted striped stack
over 2-slot inline engines, with four keys (more keys than slots, so keys keep displacing each
other in the slots while requests of every key are in flight).

Four exports, each a linear slice of one striped pool and each with its own key (two with
4096-byte data units, two with 512), take eight clients each; every export also has a shared
region checked by flush order. Zero mismatches, every client done, the server's peak RSS
reported (and bounded), keys swapped in the slots, no plaintext on disk.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from conftest import ROOT, StartServer, run
from test_stress import pattern_words_in_place

ENGINE = "{keyslots: 2, modes: {aes-256-xts: [512, 4096]}, max_dun_bytes: 8}"
KEYS = 4
CLIENTS = 32
DURATION = 55  # seconds of load; with setup, about a minute
SEED = 2024


def config() -> str:
    keys = "".join(
        f"  k{i}: {{mode: aes-256-xts, data_unit_size: {4096 if i % 2 == 0 else 512}, "
        f"source: {{file: keys/k{i}.key, create: true}}}}\n"
        for i in range(KEYS)
    )
    slices = "".join(
        f'  s{i}: {{table: ["0 65536 linear pool {i * 65536}"]}}\n' for i in range(KEYS)
    )
    exports = "".join(f"  e{i}: {{device: s{i}, key: k{i}}}\n" for i in range(KEYS))
    return (
        f"keys:\n{keys}"
        "devices:\n"
        f"  a: {{file: a.img, size: 64M, inline_crypto: {ENGINE}}}\n"
        f"  b: {{file: b.img, size: 64M, inline_crypto: {ENGINE}}}\n"
        '  pool: {table: ["0 262144 striped 2 64 a 0 b 0"]}\n'
        f"{slices}"
        f"exports:\n{exports}"
    )


def test_32_clients_for_a_minute_on_an_encrypted_striped_two_slot_stack(
    tmp_path: Path, start_server: StartServer
) -> None:
    control = tmp_path / "control.sock"
    server = start_server(config(), "--control", str(control))
    uris = [server.uri(f"e{i}", tcp=i % 2 == 1) for i in range(KEYS)]
    cmd = [sys.executable, "-m", "nbdcrypt", "stress", *uris, "--clients", str(CLIENTS)]
    cmd += ["--duration", str(DURATION), "--seed", str(SEED), "--trimmed", "any"]
    cmd += ["--shared", "256K", "--watch-pid", str(server.proc.pid), "--json"]
    proc = run(cmd, check=False, cwd=ROOT, timeout=DURATION + 120)
    summary = json.loads(proc.stdout)
    detail = f"{proc.stderr}\n{json.dumps(summary, indent=1)[:8000]}"
    assert proc.returncode == 0 and summary["ok"], detail
    assert summary["mismatches"]["count"] == 0 and summary["errors"] == {}, detail
    assert summary["clients_done"] == CLIENTS and summary["clients_failed"] == 0, detail
    for kind in ("read", "write", "flush", "trim", "zero", "shared-read", "shared-write"):
        assert summary["ops"][kind]["ops"] > 0, kind
    assert [e["clients"] for e in summary["exports"]] == [CLIENTS // KEYS] * KEYS
    assert [e["block_sizes"][0] for e in summary["exports"]] == [4096, 512, 4096, 512]

    rss = summary["server_rss"]  # the server's memory, sampled all along
    assert rss["samples"] > DURATION and not rss["gone"]
    assert 0 < rss["peak_kib"] < 2 * 1024 * 1024, rss  # bounded: well under 2 GiB
    print(f"server peak RSS {rss['peak_kib'] // 1024} MiB, {summary['ops_per_s']:.0f} ops/s")

    info = run(
        [sys.executable, "-m", "nbdcrypt", "ctl", "-s", str(control), "info", "a"], cwd=ROOT
    ).stdout
    slots = re.search(r"Keyslots: +2: (\d+) hits, (\d+) programs, (\d+) evictions", info)
    assert slots is not None, info
    assert int(slots[2]) > KEYS and int(slots[3]) > KEYS, info  # keys displaced each other
    for name in ("a.img", "b.img"):
        assert pattern_words_in_place(tmp_path / name, SEED) == 0, f"plaintext in {name}"
    assert "Traceback" not in server.log
    assert server.stop() == 0
