"""SecretBytes: key material that never prints."""

from __future__ import annotations

import pickle

import pytest

from nbdcrypt.crypto.secret import SecretBytes


def test_never_prints() -> None:
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    secret = SecretBytes(key)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>40}"):
        assert "0011" not in shown and "aabb" not in shown
    assert repr(secret) == "<secret: 16 bytes>"
    assert len(secret) == 16 and secret.reveal() == key


def test_compares_by_value_and_refuses_pickling() -> None:
    assert SecretBytes(b"a" * 16) == SecretBytes(b"a" * 16)
    assert SecretBytes(b"a" * 16) != SecretBytes(b"b" * 16)
    assert hash(SecretBytes(b"a" * 16)) == hash(SecretBytes(b"a" * 16))
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(SecretBytes(b"k" * 32))
