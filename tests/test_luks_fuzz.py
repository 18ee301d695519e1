"""Damaged headers never crash the parser: a real header with random changes either parses or
gives a LuksError naming the file, and what parses either opens or gives a LuksError.

LUKS1: random bytes changed anywhere in the binary header (hypothesis). LUKS2: the checksum
protects the JSON, so the JSON is changed (any value at any path replaced by any JSON value)
and both copies are rewritten with valid checksums, as a buggy or hostile writer could.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from luks_images import PASSPHRASE, luks_format, rewrite_luks2, write_secret

from nbdcrypt.luks import LuksError
from nbdcrypt.luks.header import Argon2, LuksHeader, read_header
from nbdcrypt.luks.unlock import unlock

SMALL = ("--luks2-metadata-size", "16k", "--luks2-keyslots-size", "256k")
FUZZ = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("luks-fuzz")
    passfile = write_secret(directory / "pass", PASSPHRASE)
    return {
        "pass": passfile,
        "l1": luks_format(directory / "l1", passfile, version=1, size="2M"),
        "l2": luks_format(directory / "l2", passfile, size="2M", extra=SMALL),
    }


def parse_and_open(path: Path, passfile: Path) -> None:
    """Either works or raises LuksError; anything else fails the test."""
    try:
        header = read_header(path)
    except LuksError as exc:
        assert str(exc).startswith(f"{path}: "), exc
        return
    if cheap(header):
        with contextlib.suppress(LuksError):
            unlock(header, passfile).wipe()


def cheap(header: LuksHeader) -> bool:
    """KDF costs a test can afford (a changed header may ask for hours or gigabytes)."""
    costs = [header.digest.iterations <= 10_000]
    for slot in header.keyslots:
        kdf = slot.kdf
        if isinstance(kdf, Argon2):
            costs.append(kdf.time <= 8 and kdf.memory <= 65536 and kdf.cpus <= 4)
        else:
            costs.append(kdf.iterations <= 10_000)
        costs.append(slot.stripes <= 8000)
    return all(costs)


@given(st.lists(st.tuples(st.integers(0, 591), st.integers(0, 255)), min_size=1, max_size=6))
@FUZZ
def test_luks1_header_bytes(
    tmp_path: Path, originals: dict[str, Path], changes: list[tuple[int, int]]
) -> None:
    data = bytearray(originals["l1"].read_bytes())
    for at, value in changes:
        data[at] = value
    path = tmp_path / "l1"
    path.write_bytes(data)
    parse_and_open(path, originals["pass"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12)
    | st.sampled_from(["0", "dynamic", "luks2", "pbkdf2", "argon2id", "crypt", "4096", "-1"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@given(st.data())
@FUZZ
def test_luks2_metadata_values(
    tmp_path: Path, originals: dict[str, Path], data: st.DataObject
) -> None:
    path = tmp_path / "l2"
    path.write_bytes(originals["l2"].read_bytes())
    doc = json.loads(path.read_bytes()[4096:16384].split(b"\0", 1)[0])
    targets = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(targets))
        value = data.draw(json_values)

        def mutate(node: Any, where: tuple[str | int, ...] = where, value: Any = value) -> None:
            for part in where[:-1]:
                node = node[part]
            node[where[-1]] = value

        try:
            mutate(doc)
        except (KeyError, IndexError, TypeError):  # an earlier change removed the path
            continue

    def replace(old: dict[str, Any]) -> None:
        old.clear()
        old.update(doc)

    rewrite_luks2(path, replace)
    parse_and_open(path, originals["pass"])
