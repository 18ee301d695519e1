"""The C loop (nbdcrypt/crypto/_units.c) against libcrypto's Python loop and cryptography.

./scripts/test installs a compiler and Python's headers, so the module must be built here:
a missing build would silently put every request back on the slower Python paths.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import nbd
import numpy as np
import pytest
from conftest import StartServer
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.crypto import XtsCipher, batch, libcrypto


def test_the_c_loop_is_built() -> None:
    assert libcrypto.native(), "nbdcrypt/crypto/_units.c was not built (gcc, python3-dev?)"


def reference(mode: str, key: bytes, data: bytes, ivs: bytes, unit: int, *, encrypt: bool) -> bytes:
    """One cryptography context per unit."""
    out = bytearray()
    for i in range(len(data) // unit):
        iv = ivs[16 * i : 16 * i + 16]
        chosen = modes.XTS(iv) if mode == "xts" else modes.CBC(iv)
        cipher = Cipher(algorithms.AES(key), chosen)
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[i * unit : (i + 1) * unit]) + ctx.finalize()
    return bytes(out)


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    mode_key=st.sampled_from([("xts", 32), ("xts", 64), ("cbc", 16), ("cbc", 24), ("cbc", 32)]),
    unit=st.sampled_from([16, 32, 512, 1024, 4096]),
    units=st.integers(1, 48),
    encrypt=st.booleans(),
)
def test_c_loop_equals_python_loop_and_cryptography(
    seed: int, mode_key: tuple[str, int], unit: int, units: int, encrypt: bool
) -> None:
    mode, key_size = mode_key
    rng = np.random.default_rng(seed)
    key, data, ivs = rng.bytes(key_size), rng.bytes(unit * units), rng.bytes(16 * units)
    if mode == "xts" and key[: key_size // 2] == key[key_size // 2 :]:
        return  # OpenSSL refuses equal halves; xts.py sends such keys to its batched path
    native = libcrypto.UnitEngine(mode, key)
    python = libcrypto.UnitEngine(mode, key, use_native=False)
    assert native.native and not python.native
    out_native, out_python = bytearray(len(data)), bytearray(len(data))
    native.run(data, ivs, unit, memoryview(out_native), encrypt=encrypt)
    python.run(data, ivs, unit, memoryview(out_python), encrypt=encrypt)
    assert out_native == out_python == reference(mode, key, data, ivs, unit, encrypt=encrypt)


def test_numpy_ivs_and_in_place() -> None:
    """IVs as a uint64 array (what batch.ivs_for gives) and output over the input."""
    key = bytes(range(64))
    data = bytearray(np.random.default_rng(1).bytes(8 * 512))
    ivs = np.zeros(16, np.uint64)
    ivs[0::2] = np.arange(8, dtype=np.uint64) + 1000
    expected = reference("xts", key, bytes(data), ivs.tobytes(), 512, encrypt=True)
    view = memoryview(data)
    libcrypto.UnitEngine("xts", key).run(view, ivs, 512, view, encrypt=True)
    assert data == expected


def test_bad_shapes_are_refused() -> None:
    engine = libcrypto.UnitEngine("xts", bytes(range(64)))
    with pytest.raises(ValueError, match="whole number of units"):
        engine.run(bytes(700), bytes(32), 512, memoryview(bytearray(700)), encrypt=True)
    with pytest.raises(ValueError, match="differ in length"):
        engine.run(bytes(1024), bytes(32), 512, memoryview(bytearray(512)), encrypt=True)
    with pytest.raises(ValueError, match="fewer IV blocks"):
        engine.run(bytes(1024), bytes(16), 512, memoryview(bytearray(1024)), encrypt=True)
    with pytest.raises(TypeError):
        engine.run(bytes(512), bytes(16), 512, memoryview(bytes(512)), encrypt=True)


def test_threads_share_an_engine() -> None:
    """Each thread gets its own context; results equal the single-threaded ones."""
    key = np.random.default_rng(2).bytes(64)
    engine = libcrypto.UnitEngine("xts", key)
    rng = np.random.default_rng(3)
    jobs = [(rng.bytes(64 * 4096), rng.bytes(64 * 16)) for _ in range(8)]
    expected = [reference("xts", key, data, ivs, 4096, encrypt=True) for data, ivs in jobs]
    results: list[bytes] = [b""] * len(jobs)

    def work(index: int) -> None:
        data, ivs = jobs[index]
        for _ in range(20):
            out = bytearray(len(data))
            engine.run(data, ivs, 4096, memoryview(out), encrypt=True)
        results[index] = bytes(out)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    key_size=st.sampled_from([32, 64]),
    unit=st.sampled_from([16, 512, 4096, 128 * 1024]),
    units=st.integers(1, 300),
    encrypt=st.booleans(),
    in_place=st.booleans(),
)
def test_xts_from_ecb_equals_cryptography(
    *, seed: int, key_size: int, unit: int, units: int, encrypt: bool, in_place: bool
) -> None:
    """XtsEngine (C, two ECB contexts), across its 64 KiB chunks and with units larger than
    a chunk, in place or not, against one cryptography XTS context per unit."""
    units = min(units, (4 << 20) // unit)
    rng = np.random.default_rng(seed)
    key, data, ivs = rng.bytes(key_size), rng.bytes(unit * units), rng.bytes(16 * units)
    out = bytearray(data) if in_place else bytearray(len(data))
    source: bytes | bytearray = out if in_place else data
    libcrypto.XtsEngine(key).run(source, ivs, unit, memoryview(out), encrypt=encrypt)
    if key[: key_size // 2] != key[key_size // 2 :]:  # cryptography refuses equal halves
        assert out == reference("xts", key, data, ivs, unit, encrypt=encrypt)
    back = bytearray(len(data))
    libcrypto.XtsEngine(key).run(bytes(out), ivs, unit, memoryview(back), encrypt=not encrypt)
    assert back == data


def test_xts_equal_halves_match_the_batched_path() -> None:
    """OpenSSL's XTS refuses K1 == K2; the kernel (and XtsEngine) accept it: check it against
    the numpy path, which implements the same definition independently."""
    key = bytes(range(32)) * 2
    data = np.random.default_rng(4).bytes(16 * 512)
    cipher = XtsCipher(key)
    native = bytes(cipher.encrypt(data, 77, 512))
    cipher._native = None  # the numpy batched path
    assert bytes(cipher.encrypt(data, 77, 512)) == native


@settings(max_examples=200, deadline=None)
@given(
    first=st.one_of(st.integers(0, 2**128 - 1), st.integers(2**64 - 40, 2**64 + 40)),
    step=st.sampled_from([1, 8, 2**20]),
    bits=st.sampled_from([32, 64, 128]),
    count=st.integers(0, 70),
)
def test_iv_blocks_from_c_equal_python(first: int, step: int, bits: int, count: int) -> None:
    """batch.ivs_for (the C module's ivs) against the Python definition, across the wraps."""
    expected = batch.iv_bytes(first, count, step, bits)
    assert bytes(batch.ivs_for(first, count, step, bits, "test")) == expected


@pytest.mark.parametrize("use_native", [True, False])
def test_libcrypto_failure_is_eio(use_native: bool) -> None:
    """OpenSSL refuses an XTS data unit over 2^20 blocks: the request fails with EIO (what the
    client gets), the C loop and the Python loop alike, and the engine still works after."""
    engine = libcrypto.UnitEngine("xts", bytes(range(64)), use_native=use_native)
    size = 32 << 20
    with pytest.raises(OSError) as caught:
        engine.run(bytes(size), bytes(16), size, memoryview(bytearray(size)), encrypt=True)
    assert caught.value.errno == errno.EIO
    out = bytearray(512)
    engine.run(bytes(512), bytes(16), 512, memoryview(out), encrypt=True)
    expected = reference("xts", bytes(range(64)), bytes(512), bytes(16), 512, encrypt=True)
    assert bytes(out) == expected


NO_C_CONFIG = """\
keys:
  k: {mode: aes-256-xts, data_unit_size: 512, source: {file: k.key, create: true}}
devices:
  f:
    file: disk.img
    size: 8M
    inline_crypto: {keyslots: 2, modes: {aes-256-xts: [512]}, max_dun_bytes: 8}
  c: {table: ["0 4096 crypt aes-xts-plain64 %s 0 f 8192"]}
exports:
  inline: {device: f, key: k}
  crypt: {device: c}
"""


def test_a_server_without_the_c_module_writes_the_same_bytes(
    tmp_path: Path, start_server: StartServer
) -> None:
    """An install without a compiler: the server says so once and serves from the Python
    paths; what lands on disk equals what the C paths compute, both through the inline engine
    (blk-crypto, DUN = 512-byte unit) and through a dm-crypt table."""
    blocker = tmp_path / "no_c_module"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['nbdcrypt.crypto._units'] = None  # as if never built\n"
    )
    table_key = np.random.default_rng(5).bytes(64)
    config = NO_C_CONFIG % table_key.hex()
    server = start_server(config, env={"PYTHONPATH": str(blocker)})
    assert "ciphers: no C module built" in server.log
    data = np.random.default_rng(6).bytes(1 << 20)  # 2048 units: the numpy batched path
    for export, offset in (("inline", 0), ("crypt", 0)):
        h = nbd.NBD()
        h.connect_uri(server.uri(export))
        h.pwrite(data, offset)
        h.flush()
        assert h.pread(len(data), offset) == data
        h.shutdown()
    assert server.stop() == 0
    disk = (tmp_path / "disk.img").read_bytes()
    key = (tmp_path / "k.key").read_bytes()
    assert libcrypto.native()  # the test process has the C module: the oracle is the C path
    inline = bytes(XtsCipher(key, iv_bits=128).encrypt(data, 0, 512))
    assert disk[: len(data)] == inline
    table = bytes(XtsCipher(table_key, iv_bits=64).encrypt(data, 0, 512))
    assert disk[8192 * 512 : 8192 * 512 + len(data)] == table
