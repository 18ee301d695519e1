"""Hypothesis over random stacks and profiles: the passthrough profile is the model's, the
submitter goes inline exactly when the profile supports the key, and either way the bytes
below are the reference ciphertext."""

from __future__ import annotations

import asyncio
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from test_keyslot import reference_encrypt

from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptoKey, CryptoMode
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.blkcrypto.submit import CryptSubmitter
from nbdcrypt.device import Device
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, parse_table
from nbdcrypt.request import Op, Request

XTS, CBC = CryptoMode.AES_256_XTS, CryptoMode.AES_128_CBC_ESSIV
PAIRS = [(m, d) for m in (XTS, CBC) for d in (512, 4096)]
SECTORS = 64  # per lower device (32 KiB)

profiles = st.builds(
    lambda pairs, dun: CryptoCaps(frozenset(pairs), dun),
    st.sets(st.sampled_from(PAIRS)),
    st.integers(1, 8),
)
# a line over the lower devices: (target, args) with the sectors it takes
lines = st.sampled_from(["linear", "striped", "zero", "error", "flakey", "delay"])


def table_for(kinds: list[str], n_lower: int) -> list[str]:
    """Lines of 16 sectors each over devices d0..d{n-1}, at distinct offsets."""
    out, start = [], 0
    for i, kind in enumerate(kinds):
        dev, other, off = f"d{i % n_lower}", f"d{(i + 1) % n_lower}", (i // n_lower) * 16
        args = {
            "linear": f"linear {dev} {off}",
            "striped": f"striped 2 8 {dev} {off} {other} {off + 8}",
            "zero": "zero",
            "error": "error",
            "flakey": f"flakey {dev} {off} 1 0",
            "delay": f"delay {dev} {off} 0",
        }[kind]
        out.append(f"{start} 16 {args}")
        start += 16
    return out


def model_caps(kinds: list[str], caps: list[CryptoCaps]) -> CryptoCaps:
    passes = {"linear", "striped", "error", "flakey"}
    if any(k not in passes for k in kinds):
        return CryptoCaps.none()
    result = CryptoCaps.everything()
    n = len(caps)
    for i, kind in enumerate(kinds):
        used = {i % n, (i + 1) % n} if kind == "striped" else set() if kind == "error" else {i % n}
        for j in used:
            result &= caps[j]
    return result if result else CryptoCaps.none()


@settings(max_examples=60, deadline=None)
@given(
    caps=st.lists(profiles, min_size=1, max_size=3),
    kinds=st.lists(lines, min_size=1, max_size=3),
    pair=st.sampled_from(PAIRS),
    dun_bytes=st.integers(1, 8),
)
def test_random_stacks_profiles_and_routing(
    caps: list[CryptoCaps], kinds: list[str], pair: tuple[CryptoMode, int], dun_bytes: int
) -> None:
    async def run() -> None:
        n = len(caps)
        lowers: dict[str, Device] = {
            f"d{i}": InlineCryptoDevice(MemoryDevice(f"d{i}", SECTORS * 512 * 2), c, 2)
            for i, c in enumerate(caps)
        }
        top = MappedDevice("top", Table.build(parse_table(table_for(kinds, n)), lowers))
        expected = model_caps(kinds, caps)
        assert top.crypto_caps == expected

        mode, unit = pair
        key = CryptoKey("k", mode, unit, dun_bytes, bytearray(os.urandom(mode.key_size)))
        first = next((i for i, k in enumerate(kinds) if k in ("linear", "flakey")), None)
        if first is None or unit > 16 * 512:
            return
        # a write into the first linear-like line, then the bytes on its device below
        data = os.urandom(unit)
        offset = first * 16 * 512
        await CryptSubmitter(top, key).write(Request(Op.WRITE, offset, unit, data=data))
        inline = expected.supports(key)
        assert (top.fallback_bytes == 0) == inline
        engine = lowers[f"d{first % n}"]
        assert isinstance(engine, InlineCryptoDevice)
        assert (engine.requests > 0) == inline
        raw = engine.inner
        where = (first // n) * 16 * 512
        below = bytes(await raw.read(Request(Op.READ, where, unit)))
        assert below == reference_encrypt(key, offset // unit, data)
        back = await CryptSubmitter(top, key).read(Request(Op.READ, offset, unit))
        assert bytes(back) == data

    asyncio.run(run())
