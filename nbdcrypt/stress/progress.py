"""The progress line of a stress run on stderr: elapsed time, operations, ops/s and MB/s over
the last interval, errors and mismatches, rewritten in place with a carriage return."""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

from nbdcrypt.stress.stats import Stats

INTERVAL = 1.0  # seconds between updates


def progress_line(elapsed: float, stats: Stats, ops_per_s: float, bytes_per_s: float) -> str:
    return (
        f"{elapsed:7.1f}s  {stats.total_ops:>10} ops  {ops_per_s:>9.0f} ops/s  "
        f"{bytes_per_s / 1e6:>8.1f} MB/s  errors {stats.total_errors - stats.mismatch_count}  "
        f"mismatches {stats.mismatch_count}"
    )


async def show_progress(stats: Stats, out: TextIO, stop: asyncio.Event) -> None:
    """Rewrite the line every INTERVAL until `stop`, then end it with a newline."""
    start = last_t = time.monotonic()
    last_ops, last_bytes = stats.total_ops, stats.total_bytes
    width = 0
    while not stop.is_set():
        try:
            async with asyncio.timeout(INTERVAL):
                await stop.wait()
        except TimeoutError:
            pass
        now = time.monotonic()
        span = max(now - last_t, 1e-6)
        ops, nbytes = stats.total_ops, stats.total_bytes
        line = progress_line(
            now - start, stats, (ops - last_ops) / span, (nbytes - last_bytes) / span
        )
        out.write("\r" + line.ljust(width))
        out.flush()
        width = len(line)
        last_t, last_ops, last_bytes = now, ops, nbytes
    out.write("\n")
    out.flush()
