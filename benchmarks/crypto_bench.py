#!/usr/bin/env python3
"""Micro-benchmark of nbdcrypt.crypto: MB/s of whole-request encryption and decryption.

For each cipher, request size and data unit size it runs the cipher on random data for about
`--seconds` and prints MB/s of CPU time (process_time, so other load on the machine distorts it
less than wall time) and of wall time. `--compare` adds `cryptography`'s one-context-per-unit
reference, which is what a naive implementation costs.

    python benchmarks/crypto_bench.py                    # the default table
    python benchmarks/crypto_bench.py --sizes 4K,1M --units 4096 --seconds 0.5
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.crypto import CbcCipher, XtsCipher

Run = Callable[[bytes], object]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def measure(run: Run, data: bytes, seconds: float) -> tuple[float, float]:
    """(MB/s of CPU time, MB/s of wall time) over about `seconds` of repeated runs."""
    run(data)  # warm up: scratch buffers, contexts
    count = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while True:
        run(data)
        count += 1
        wall = time.perf_counter() - wall0
        if wall >= seconds and count >= 3:
            break
    cpu = max(time.process_time() - cpu0, 1e-9)
    total = count * len(data) / 1e6
    return total / cpu, total / wall


def reference_xts(key: bytes, unit: int) -> Run:
    algorithm = algorithms.AES(key)

    def run(data: bytes) -> object:
        out = bytearray(len(data) + 16)
        view = memoryview(out)
        for i in range(len(data) // unit):
            ctx = Cipher(algorithm, modes.XTS(i.to_bytes(16, "little"))).encryptor()
            ctx.update_into(data[i * unit : (i + 1) * unit], view[i * unit :])
        return out

    return run


def cases(unit: int, compare: bool) -> list[tuple[str, Run]]:
    xts = XtsCipher(os.urandom(64), iv_bits=64)
    cbc = CbcCipher(os.urandom(32), essiv="sha256")
    found: list[tuple[str, Run]] = [
        ("aes-xts-plain64 (256) encrypt", lambda d: xts.encrypt(d, 1 << 20, unit)),
        ("aes-xts-plain64 (256) decrypt", lambda d: xts.decrypt(d, 1 << 20, unit)),
        ("aes-cbc-essiv:sha256 encrypt", lambda d: cbc.encrypt(d, 1 << 20, unit)),
        ("aes-cbc-essiv:sha256 decrypt", lambda d: cbc.decrypt(d, 1 << 20, unit)),
    ]
    if compare:
        found.append(("per-unit cryptography XTS", reference_xts(os.urandom(64), unit)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4K,128K,1M", help="request sizes (4K, 128K, 1M)")
    parser.add_argument("--units", default="512,4096", help="data unit sizes")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--compare", action="store_true", help="add the per-unit reference")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    units = [int(u) for u in args.units.split(",")]
    print(f"{'cipher':32} {'unit':>5} {'request':>8} {'MB/s cpu':>9} {'MB/s wall':>9}")
    for unit in units:
        for name, run in cases(unit, args.compare):
            for size in sizes:
                if size < unit:
                    continue
                data = os.urandom(size)
                cpu, wall = measure(run, data, args.seconds)
                label = f"{size // 1024}K"
                print(f"{name:32} {unit:5} {label:>8} {cpu:9.0f} {wall:9.0f}", flush=True)


if __name__ == "__main__":
    main()
