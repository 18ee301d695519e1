"""Client rules without a server: the `clients:` section and export keys in the config, rule
matching (against a plain reference model, with hypothesis), what each client may list and open
(ExportAccess), and the key users and evictions behind `evict: on-idle` and `ctl evict-key`."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptContext, CryptoKey, CryptoMode
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.clients import (
    ExportAccess,
    canonical_san,
    describe_rule,
    first_match,
    matches,
)
from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import ClientMatch, ClientRule, Evict, KeyEnv, KeyFile
from nbdcrypt.device import Device
from nbdcrypt.export import Export
from nbdcrypt.keyuse import KeyUsers, evict_everywhere
from nbdcrypt.nbd.constants import TransmissionFlag
from nbdcrypt.request import Op, Request
from nbdcrypt.server.identity import PeerIdentity

BASE = """\
# client rules, the keys they give, and the exports they grant
server:
  listen: tcp://127.0.0.1:10809
keys:
  alice: {mode: aes-256-xts, data_unit_size: 4096, source: {file: alice.key}}
  bob: {mode: aes-256-xts, data_unit_size: 512, source: {env: NBD_KEY_BOB}}
  tiny: {mode: aes-256-xts, data_unit_size: 512, dun_bytes: 1, source: {credential: tiny}}
devices:
  mem: {memory: 1M}
  odd: {memory: 6144}
exports:
  vault: {device: mem, encryption: per-client, evict: on-idle}
  demo: {device: mem, readonly: true}
  plain: {device: mem, key: alice}
  oddity: {device: odd, encryption: per-client}
"""  # 15 lines
CLIENTS = BASE + "clients:\n"  # rules start at line 17


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    return message.removeprefix(f"{path}:")


# --- the config --------------------------------------------------------------------------------


def test_rules_as_loaded(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        CLIENTS
        + """\
  - match: {tls_subject: "CN=alice,O=Example", tls_san: "dns:Alice.Example.COM"}
    exports: {vault: rw, demo: ro}
    key: alice
  - match: {unix_uid: 1000, unix_gid: 100}
    exports: {vault: ro}
    key: bob
  - match: {address: 10.0.0.0/8}
    exports: {plain: rw}
  - match: {address: "::1", tls_san: "IP:0:0::0:1"}
    exports: {plain: ro}
  - match: anonymous
    exports: {demo: ro}
"""
    )
    config = load_config(path)
    assert config.clients == (
        ClientRule(
            0,
            ClientMatch(tls_subject="CN=alice,O=Example", tls_san="DNS:alice.example.com"),
            {"vault": False, "demo": True},
            "alice",
        ),
        ClientRule(1, ClientMatch(unix_uid=1000, unix_gid=100), {"vault": True}, "bob"),
        ClientRule(2, ClientMatch(address=ipaddress.ip_network("10.0.0.0/8")), {"plain": False}),
        ClientRule(
            3,
            ClientMatch(address=ipaddress.ip_network("::1"), tls_san="IP:::1"),
            {"plain": True},
        ),
        ClientRule(4, ClientMatch(anonymous=True), {"demo": True}),
    )
    vault = config.exports["vault"]
    assert vault.per_client_key and vault.key is None and vault.evict is Evict.ON_IDLE
    assert config.exports["plain"].key == "alice" and config.exports["plain"].evict is Evict.NEVER
    assert config.keys["alice"].source == KeyFile(tmp_path / "alice.key")
    assert config.keys["bob"].source == KeyEnv("NBD_KEY_BOB")
    assert [describe_rule(rule) for rule in config.clients] == [
        "[0] tls_subject='CN=alice,O=Example' tls_san='DNS:alice.example.com': vault rw, demo ro;"
        " key alice",
        "[1] unix_uid=1000 unix_gid=100: vault ro; key bob",
        "[2] address=10.0.0.0/8: plain rw",
        "[3] tls_san='IP:::1' address=::1/128: plain ro",
        "[4] anonymous: demo ro",
    ]


def test_no_clients_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("encryption: per-client, evict: on-idle", "key: bob")
                    .replace("  oddity: {device: odd, encryption: per-client}\n", ""))  # fmt: skip
    assert load_config(path).clients is None


RULE_ERRORS = [
    # the section
    (
        "not-a-list",
        BASE + "clients: {a: 1}\n",
        "16: clients: expected a list of client rules, got a mapping",
    ),
    (
        "empty",
        BASE + "clients: []\n",
        "16: clients: expected at least one rule (leave clients out to let anyone open any export)",
    ),
    (
        "rule-string",
        CLIENTS + "  - anonymous\n",
        "17: clients[0]: expected a mapping, got a string 'anonymous'",
    ),
    (
        "rule-unknown-key",
        CLIENTS + "  - {match: anonymous, exports: {demo: ro}, who: x}\n",
        "17: clients[0].who: unknown key (allowed: match, exports, key)",
    ),
    (
        "rule-no-match",
        CLIENTS + "  - {exports: {demo: ro}}\n",
        "17: clients[0]: missing key 'match'",
    ),
    (
        "rule-no-exports",
        CLIENTS + "  - {match: anonymous}\n",
        "17: clients[0]: missing key 'exports'",
    ),
    (
        "second-rule",
        CLIENTS + "  - {match: anonymous, exports: {demo: ro}}\n  - {match: anonymous}\n",
        "18: clients[1]: missing key 'exports'",
    ),
    # match
    (
        "match-word",
        CLIENTS + "  - {match: everyone, exports: {demo: ro}}\n",
        "17: clients[0].match: expected anonymous, or a mapping of what to match (tls_subject, "
        "tls_san, address, unix_uid, unix_gid), got 'everyone'",
    ),
    (
        "match-list",
        CLIENTS + "  - {match: [anonymous], exports: {demo: ro}}\n",
        "17: clients[0].match: expected anonymous, or a mapping of what to match (tls_subject, "
        "tls_san, address, unix_uid, unix_gid), got a list",
    ),
    (
        "match-null",
        CLIENTS + "  - {match: null, exports: {demo: ro}}\n",
        "17: clients[0].match: expected anonymous, or a mapping of what to match (tls_subject, "
        "tls_san, address, unix_uid, unix_gid), got null",
    ),
    (
        "match-empty",
        CLIENTS + "  - {match: {}, exports: {demo: ro}}\n",
        "17: clients[0].match: expected at least one of tls_subject, tls_san, address, unix_uid, "
        "unix_gid (or match: anonymous)",
    ),
    (
        "match-unknown",
        CLIENTS + "  - {match: {uid: 0}, exports: {demo: ro}}\n",
        "17: clients[0].match.uid: unknown key (allowed: tls_subject, tls_san, address, unix_uid, "
        "unix_gid)",
    ),
    (
        "match-anonymous-key",
        CLIENTS + "  - {match: {anonymous: true}, exports: {demo: ro}}\n",
        "17: clients[0].match.anonymous: unknown key (allowed: tls_subject, tls_san, address, "
        "unix_uid, unix_gid)",
    ),
    (
        "address-host-bits",
        CLIENTS + "  - {match: {address: 10.0.0.1/8}, exports: {demo: ro}}\n",
        "17: clients[0].match.address: expected an IP address or network such as 10.0.0.0/8 or "
        "::1: 10.0.0.1/8 has host bits set",
    ),
    (
        "address-name",
        CLIENTS + "  - {match: {address: localhost}, exports: {demo: ro}}\n",
        "17: clients[0].match.address: expected an IP address or network such as 10.0.0.0/8 or "
        "::1: 'localhost' does not appear to be an IPv4 or IPv6 network",
    ),
    (
        "address-int",
        CLIENTS + "  - {match: {address: 10}, exports: {demo: ro}}\n",
        "17: clients[0].match.address: expected a string, got an integer '10' (put it in quotes)",
    ),
    (
        "address-and-uid",
        CLIENTS + "  - {match: {address: 10.0.0.0/8, unix_uid: 0}, exports: {demo: ro}}\n",
        "17: clients[0].match.unix_uid: address matches TCP clients and unix_uid/unix_gid unix "
        "socket clients: no client has both (write two rules)",
    ),
    (
        "uid-negative",
        CLIENTS + "  - {match: {unix_uid: -1}, exports: {demo: ro}}\n",
        "17: clients[0].match.unix_uid: expected a uid or gid from 0 to 4294967294, got -1",
    ),
    (
        "uid-huge",
        CLIENTS + "  - {match: {unix_gid: 4294967295}, exports: {demo: ro}}\n",
        "17: clients[0].match.unix_gid: expected a uid or gid from 0 to 4294967294, got 4294967295",
    ),
    (
        "uid-name",
        CLIENTS + "  - {match: {unix_uid: root}, exports: {demo: ro}}\n",
        "17: clients[0].match.unix_uid: expected an integer, got a string 'root'",
    ),
    (
        "subject-empty",
        CLIENTS + "  - {match: {tls_subject: ''}, exports: {demo: ro}}\n",
        '17: clients[0].match.tls_subject: expected a subject such as "CN=alice,O=Example", got '
        "''",
    ),
    (
        "subject-no-equals",
        CLIENTS + "  - {match: {tls_subject: alice}, exports: {demo: ro}}\n",
        '17: clients[0].match.tls_subject: expected a subject such as "CN=alice,O=Example", got '
        "'alice'",
    ),
    (
        "san-no-type",
        CLIENTS + "  - {match: {tls_san: alice.example.com}, exports: {demo: ro}}\n",
        "17: clients[0].match.tls_san: expected a subjectAltName as TYPE:VALUE with TYPE one of "
        "DNS, IP, email, URI (such as DNS:alice.example.com), got 'alice.example.com'",
    ),
    (
        "san-bad-type",
        CLIENTS + "  - {match: {tls_san: 'otherName:x'}, exports: {demo: ro}}\n",
        "17: clients[0].match.tls_san: expected a subjectAltName as TYPE:VALUE with TYPE one of "
        "DNS, IP, email, URI (such as DNS:alice.example.com), got 'otherName:x'",
    ),
    (
        "san-bad-ip",
        CLIENTS + "  - {match: {tls_san: 'IP:10.0.0.300'}, exports: {demo: ro}}\n",
        "17: clients[0].match.tls_san: invalid IP address '10.0.0.300' in a subjectAltName",
    ),
    # exports
    (
        "exports-list",
        CLIENTS + "  - {match: anonymous, exports: [demo]}\n",
        "17: clients[0].exports: expected a mapping of export names to rw or ro, such as {vault: "
        "rw, demo: ro}, got a list",
    ),
    (
        "exports-empty",
        CLIENTS + "  - {match: anonymous, exports: {}}\n",
        "17: clients[0].exports: expected at least one export",
    ),
    (
        "exports-unknown",
        CLIENTS + "  - {match: anonymous, exports: {nope: ro}}\n",
        "17: clients[0].exports.nope: unknown export 'nope' (exports: vault, demo, plain, oddity)",
    ),
    (
        "exports-bad-access",
        CLIENTS + "  - {match: anonymous, exports: {demo: rwx}}\n",
        "17: clients[0].exports.demo: expected rw (read-write) or ro (read-only), got 'rwx'",
    ),
    (
        "exports-bool",
        CLIENTS + "  - {match: anonymous, exports: {demo: true}}\n",
        "17: clients[0].exports.demo: expected rw or ro, got the boolean true",
    ),
    (
        "exports-twice",
        CLIENTS + "  - match: anonymous\n    exports:\n      demo: ro\n      demo: ro\n",
        "20: clients[0].exports.demo: duplicate key (first at line 19)",
    ),
    (
        "readonly-export-rw",
        CLIENTS + "  - {match: anonymous, exports: {demo: rw}}\n",
        "17: clients[0].exports.demo: export 'demo' is readonly: grant it ro",
    ),
    # keys
    (
        "per-client-without-key",
        CLIENTS + "  - match: anonymous\n    exports: {demo: ro, vault: rw}\n",
        "18: clients[0].exports.vault: export 'vault' takes its key from the client's rule "
        "(encryption: per-client), and this rule has no key",
    ),
    (
        "key-unknown",
        CLIENTS + "  - {match: anonymous, exports: {vault: rw}, key: carol}\n",
        "17: clients[0].key: unknown key 'carol' (keys: alice, bob, tiny)",
    ),
    (
        "key-without-use",
        CLIENTS + "  - {match: anonymous, exports: {plain: rw}, key: bob}\n",
        "17: clients[0].key: none of this rule's exports takes its key from the rule (encryption: "
        "per-client); an export's fixed key is its own key: NAME",
    ),
    (
        "key-units",
        CLIENTS + "  - {match: anonymous, exports: {oddity: rw}, key: alice}\n",
        "17: clients[0].key: key alice has 4096-byte data units; the device's 6144 bytes are not "
        "a whole number of them (export 'oddity')",
    ),
    (
        "key-dun-bytes",
        CLIENTS + "  - {match: anonymous, exports: {vault: rw}, key: tiny}\n",
        "17: clients[0].key: key tiny has 1-byte DUNs, enough for 256 data units; the device has "
        "2048 (export 'vault')",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in RULE_ERRORS], ids=[c[0] for c in RULE_ERRORS]
)
def test_rule_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert config_error(tmp_path, text) == expected


EXPORT_ERRORS = [
    (
        "both-keys",
        "  x: {device: mem, key: alice, encryption: per-client}\n",
        "18: exports.x.key: an export has a fixed key or takes the client's (encryption: "
        "per-client), not both",
    ),
    (
        "encryption-value",
        "  x: {device: mem, encryption: per-connection}\n",
        "18: exports.x.encryption: expected per-client, got 'per-connection' (a fixed key is "
        "'key: NAME'; for no key leave both out)",
    ),
    (
        "evict-value",
        "  x: {device: mem, key: alice, evict: always}\n",
        "18: exports.x.evict: expected on-idle or never, got 'always'",
    ),
    (
        "evict-no-key",
        "  x: {device: mem, evict: on-idle}\n",
        "18: exports.x.evict: the export has no key to evict (key: NAME or encryption: per-client)",
    ),
    (
        "fixed-key-units",
        "  x: {device: odd, key: alice}\n",
        "18: exports.x.key: key alice has 4096-byte data units; the device's 6144 bytes are not a "
        "whole number of them",
    ),
    (
        "fixed-key-dun",
        "  x: {device: mem, key: tiny}\n",
        "18: exports.x.key: key tiny has 1-byte DUNs, enough for 256 data units; the device has "
        "2048",
    ),
]


@pytest.mark.parametrize(
    ("line", "expected"), [c[1:] for c in EXPORT_ERRORS], ids=[c[0] for c in EXPORT_ERRORS]
)
def test_export_key_errors(tmp_path: Path, line: str, expected: str) -> None:
    text = BASE.replace("  oddity:", line.rstrip("\n") + "\n  oddity:")  # line 14 becomes x
    text = text.replace("  x:", "  x:", 1)
    got = config_error(tmp_path, text + "clients:\n  - {match: anonymous, exports: {demo: ro}}\n")
    assert got == expected.replace("18:", "15:")


def test_per_client_needs_clients(tmp_path: Path) -> None:
    assert config_error(tmp_path, BASE) == (
        "12: exports.vault.encryption: per-client keys come from client rules: add a clients: "
        "section"
    )


SOURCE_ERRORS = [
    (
        "none",
        "{}",
        "4: keys.k.source: missing the source: 'file: PATH', 'env: VARIABLE' or 'credential: NAME'",
    ),
    (
        "two",
        "{file: k, env: K}",
        "4: keys.k.source.env: a key has one source; this one is already file",
    ),
    (
        "create-env",
        "{env: K, create: true}",
        "4: keys.k.source.create: only for key files (it makes a missing file)",
    ),
    ("env-name", "{env: 1KEY}", "4: keys.k.source.env: invalid environment variable name '1KEY'"),
    (
        "env-int",
        "{env: 12}",
        "4: keys.k.source.env: expected a string, got an integer '12' (put it in quotes)",
    ),
    (
        "credential-slash",
        "{credential: a/b}",
        "4: keys.k.source.credential: invalid credential name 'a/b' (a file name, no '/')",
    ),
    (
        "credential-dots",
        "{credential: ..}",
        "4: keys.k.source.credential: invalid credential name '..' (a file name, no '/')",
    ),
    (
        "unknown",
        "{vault: x}",
        "4: keys.k.source.vault: unknown key (allowed: file, create, env, credential)",
    ),
]


@pytest.mark.parametrize(
    ("source", "expected"), [c[1:] for c in SOURCE_ERRORS], ids=[c[0] for c in SOURCE_ERRORS]
)
def test_key_source_errors(tmp_path: Path, source: str, expected: str) -> None:
    text = (
        "server: {listen: tcp://127.0.0.1:1}\nkeys:\n  k:\n"
        f"    {{mode: aes-256-xts, data_unit_size: 512, source: {source}}}\n"
        "devices: {d: {memory: 1M}}\nexports: {e: {device: d}}\n"
    )
    assert config_error(tmp_path, text) == expected


# --- matching ----------------------------------------------------------------------------------

ADDRESSES = ["127.0.0.1", "10.1.2.3", "192.168.7.9", "::1", "fd00::5", "::ffff:10.1.2.3"]
NETWORKS = ["127.0.0.0/8", "10.0.0.0/8", "10.1.2.3/32", "192.168.0.0/16", "::1/128", "fd00::/8"]
SUBJECTS = ["CN=alice,O=Example", "CN=bob,O=Example", "CN=alice"]
SANS = ["DNS:alice.example.com", "DNS:bob.example.com", "IP:10.1.2.3", "email:a@example.com"]


def _reference_in(address: str, network: str) -> bool:
    """Prefix comparison on the integers, IPv4-mapped IPv6 addresses seen as IPv4."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    base, _, plen = network.partition("/")
    net = ipaddress.ip_address(base)
    if net.version != ip.version:
        return False
    shift = ip.max_prefixlen - int(plen)
    return int(ip) >> shift == int(net) >> shift


def reference(rules: list[ClientMatch], who: PeerIdentity) -> int | None:
    """The index of the first matching rule, written out one criterion at a time."""
    for index, m in enumerate(rules):
        ok = True
        if m.anonymous:
            return index
        if m.tls_subject is not None:
            ok = ok and who.tls and who.tls_subject == m.tls_subject
        if m.tls_san is not None:
            ok = ok and who.tls and m.tls_san in who.tls_sans
        if m.address is not None:
            ok = ok and who.transport == "tcp"
            ok = ok and who.address is not None and _reference_in(who.address, str(m.address))
        if m.unix_uid is not None:
            ok = ok and who.transport == "unix" and who.uid == m.unix_uid
        if m.unix_gid is not None:
            ok = ok and who.transport == "unix" and who.gid == m.unix_gid
        if ok:
            return index
    return None


@st.composite
def identities(draw: st.DrawFn) -> PeerIdentity:
    tls = draw(st.booleans())
    subject = draw(st.sampled_from([None, *SUBJECTS])) if tls else None
    sans = tuple(draw(st.lists(st.sampled_from(SANS), max_size=2, unique=True))) if tls else ()
    if draw(st.booleans()):
        return PeerIdentity(
            "tcp", address=draw(st.sampled_from(ADDRESSES)), port=draw(st.integers(1, 65535)),
            tls=tls, tls_subject=subject, tls_sans=sans,
        )  # fmt: skip
    ids = st.sampled_from([None, 0, 1000, 65534])
    return PeerIdentity(
        "unix", pid=draw(st.integers(1, 99999)), uid=draw(ids), gid=draw(ids),
        tls=tls, tls_subject=subject, tls_sans=sans,
    )  # fmt: skip


@st.composite
def client_matches(draw: st.DrawFn) -> ClientMatch:
    if draw(st.integers(0, 7)) == 0:
        return ClientMatch(anonymous=True)
    maybe = st.booleans()
    network = draw(st.sampled_from(NETWORKS)) if draw(maybe) else None
    uid = draw(st.sampled_from([0, 1000, 65534])) if network is None and draw(maybe) else None
    gid = draw(st.sampled_from([0, 1000, 65534])) if network is None and draw(maybe) else None
    return ClientMatch(
        tls_subject=draw(st.sampled_from(SUBJECTS)) if draw(maybe) else None,
        tls_san=draw(st.sampled_from(SANS)) if draw(maybe) else None,
        address=ipaddress.ip_network(network) if network else None,
        unix_uid=uid,
        unix_gid=gid,
    )


@settings(max_examples=400, deadline=None)
@given(st.lists(client_matches(), max_size=6), identities())
def test_first_match_is_the_reference(rules: list[ClientMatch], who: PeerIdentity) -> None:
    found = first_match([ClientRule(i, m, {"e": True}) for i, m in enumerate(rules)], who)
    assert (found.index if found else None) == reference(rules, who)


def test_matching_details() -> None:
    tcp = PeerIdentity("tcp", address="::ffff:10.1.2.3", port=5)
    assert matches(ClientMatch(address=ipaddress.ip_network("10.0.0.0/8")), tcp)
    assert not matches(ClientMatch(address=ipaddress.ip_network("::ffff:0:0/96")), tcp)
    unix = PeerIdentity("unix", pid=1, uid=0, gid=0)
    assert not matches(ClientMatch(address=ipaddress.ip_network("0.0.0.0/0")), unix)
    assert matches(ClientMatch(unix_uid=0), unix)
    assert not matches(ClientMatch(unix_uid=0), PeerIdentity("unix"))  # no SO_PEERCRED
    assert not matches(ClientMatch(unix_uid=0), PeerIdentity("tcp", address="127.0.0.1"))
    # TLS criteria hold only over TLS, and subjects compare exactly
    cert = PeerIdentity(
        "tcp", address="127.0.0.1", tls=True, tls_subject="CN=alice,O=Example",
        tls_sans=("DNS:Alice.Example.com", "IP:0:0:0:0:0:0:0:1"),
    )  # fmt: skip
    assert matches(ClientMatch(tls_subject="CN=alice,O=Example"), cert)
    assert not matches(ClientMatch(tls_subject="CN=alice, O=Example"), cert)
    assert matches(ClientMatch(tls_san="DNS:alice.example.com"), cert)
    assert matches(ClientMatch(tls_san="IP:::1"), cert)
    plain = PeerIdentity("tcp", address="127.0.0.1", tls_subject="CN=alice,O=Example")
    assert not matches(ClientMatch(tls_subject="CN=alice,O=Example"), plain)
    anonymous_tls = PeerIdentity("tcp", address="127.0.0.1", tls=True)
    assert matches(ClientMatch(anonymous=True), anonymous_tls)
    assert not matches(ClientMatch(tls_subject="CN=alice,O=Example"), anonymous_tls)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("DNS:Alice.Example.COM", "DNS:alice.example.com"),
        ("dns:x", "DNS:x"),
        ("IP:0:0::1", "IP:::1"),
        ("ip:010.1.2.3", None),
        ("EMAIL:Alice@Example.com", "email:Alice@Example.com"),
        ("uri:https://x/Y", "URI:https://x/Y"),
        ("DNS:", None),
        ("x", None),
    ],
)
def test_canonical_san(text: str, canonical: str | None) -> None:
    if canonical is None:
        with pytest.raises(ValueError, match="subjectAltName"):
            canonical_san(text)
    else:
        assert canonical_san(text) == canonical


# --- what each client may list and open ---------------------------------------------------------


def make_key(name: str, unit: int = 4096) -> CryptoKey:
    return CryptoKey(name, CryptoMode.AES_256_XTS, unit, 8, bytearray(os.urandom(64)))


def exports_of(device: MemoryDevice, alice: CryptoKey) -> dict[str, Export]:
    return {
        "vault": Export("vault", device, per_client_key=True, evict_on_idle=True),
        "demo": Export("demo", device, readonly=True, description="read me"),
        "plain": Export("plain", device, key=alice),
    }


def test_access_without_rules() -> None:
    alice = make_key("alice")
    exports = exports_of(MemoryDevice("m", 1 << 20), alice)
    access = ExportAccess(exports, "demo", None, {"alice": alice})
    who = PeerIdentity("unix", pid=1, uid=1000, gid=1000)
    assert [e.name for e in access.listed(who)] == ["vault", "demo", "plain"]
    default = access.open(who, "")
    assert default is not None and default.name == "demo" and default.readonly
    plain = access.open(who, "plain")
    assert plain is not None and plain.key is alice and not plain.readonly
    assert plain.block_sizes[0] == 4096 and not plain.sparse_reads
    assert access.open(who, "nope") is None


def test_access_with_rules() -> None:
    alice, bob = make_key("alice"), make_key("bob", 512)
    device = MemoryDevice("m", 1 << 20)
    exports = exports_of(device, alice)
    rules = [
        ClientRule(0, ClientMatch(unix_uid=0), {"vault": False, "demo": True}, "alice"),
        ClientRule(1, ClientMatch(unix_uid=1000), {"vault": True, "plain": False}, "bob"),
        ClientRule(2, ClientMatch(anonymous=True), {"demo": True}),
    ]
    access = ExportAccess(exports, "vault", rules, {"alice": alice, "bob": bob})
    root = PeerIdentity("unix", pid=1, uid=0, gid=0)
    user = PeerIdentity("unix", pid=2, uid=1000, gid=1000)
    guest = PeerIdentity("tcp", address="192.0.2.1", port=9)
    assert [e.name for e in access.listed(root)] == ["vault", "demo"]
    assert [e.name for e in access.listed(user)] == ["vault", "plain"]
    assert [e.name for e in access.listed(guest)] == ["demo"]
    # one export, two keys: each connection gets its own key context and submitter
    mine, theirs = access.open(root, "vault"), access.open(user, "")
    assert mine is not None and theirs is not None
    assert mine.key is alice and theirs.key is bob and mine.io is not theirs.io
    assert mine.block_sizes[0] == 4096 and theirs.block_sizes[0] == 512
    assert mine.rule == 0 and theirs.rule == 1
    tf = TransmissionFlag
    assert not mine.transmission_flags(structured=True) & tf.READ_ONLY
    assert theirs.readonly and theirs.transmission_flags(structured=True) & tf.READ_ONLY
    # a fixed key stays the export's own, whatever the rule's key is
    plain = access.open(user, "plain")
    assert plain is not None and plain.key is alice
    # not granted looks like not there
    assert access.open(guest, "vault") is None and access.open(guest, "plain") is None
    assert access.open(guest, "") is None
    nobody = ExportAccess(exports, None, rules[:2], {"alice": alice, "bob": bob})
    assert nobody.listed(guest) == [] and nobody.open(guest, "demo") is None


# --- key users and eviction ---------------------------------------------------------------------


class Holder:
    def __init__(self) -> None:
        self.inflight = 0


def engine(name: str, slots: int = 2) -> InlineCryptoDevice:
    caps = CryptoCaps.of({CryptoMode.AES_256_XTS: (512, 4096)}, 8)
    return InlineCryptoDevice(MemoryDevice(name, 1 << 20), caps, slots)


async def program(dev: InlineCryptoDevice, key: CryptoKey) -> None:
    data = bytes(key.data_unit_size)
    ctx = CryptContext(key, 0)
    await dev.write(Request(Op.WRITE, 0, len(data), data=data, crypt=ctx))


def test_key_users_and_on_idle_eviction() -> None:
    async def run() -> None:
        alice, bob = make_key("alice"), make_key("bob")
        dev = engine("a")
        vault = Export("vault", dev, per_client_key=True, evict_on_idle=True)
        keep = Export("keep", dev, key=bob)
        users = KeyUsers()
        one, two, three = Holder(), Holder(), Holder()
        v1, v2, v3 = vault.open(alice, readonly=False), vault.open(alice, readonly=False), None
        v3 = keep.open(bob, readonly=False)
        for view, holder in ((v1, one), (v2, two), (v3, three)):
            users.join(view, holder)
        await program(dev, alice)
        await program(dev, bob)
        assert users.connections(alice) == 2 and dev.holds_key(alice)
        users.left(v1, one)
        await asyncio.sleep(0)
        assert dev.holds_key(alice)  # another connection still uses it on this export
        users.left(v2, two)
        await asyncio.sleep(0)
        assert not dev.holds_key(alice) and dev.stats.evictions == 1
        users.left(v3, three)  # evict: never
        await asyncio.sleep(0)
        assert dev.holds_key(bob) and dev.stats.evictions == 1
        assert users.connections(alice) == users.connections(bob) == 0

    asyncio.run(run())


def test_evict_everywhere_busy_then_done() -> None:
    async def run() -> None:
        alice = make_key("alice")
        a, b, c = engine("a"), engine("b"), engine("c", slots=0)
        devices: list[Device] = [a, b, c, MemoryDevice("plain", 4096)]
        users = KeyUsers()
        holder = Holder()
        users.join(Export("v", a, key=alice).open(alice, readonly=False), holder)
        assert await evict_everywhere(alice, devices, users) == []  # not programmed anywhere
        for dev in (a, b, c):
            await program(dev, alice)
        holder.inflight = 2  # requests in flight on a connection using the key
        with pytest.raises(OSError) as busy:
            await evict_everywhere(alice, devices, users)
        assert busy.value.errno == errno.EBUSY
        assert "2 request(s) in flight on 1 connection(s)" in str(busy.value.strerror)
        assert a.holds_key(alice) and b.holds_key(alice)  # nothing evicted
        holder.inflight = 0
        assert b.keyslots is not None
        slot = await b.keyslots.get_slot(alice)  # a keyslot held by a request below
        with pytest.raises(OSError, match="a keyslot holding it is in use on b"):
            await evict_everywhere(alice, devices, users)
        b.keyslots.put_slot(slot)
        assert await evict_everywhere(alice, devices, users) == ["a", "b", "c"]
        assert not any(dev.holds_key(alice) for dev in (a, b, c))
        assert a.stats.evictions == b.stats.evictions == 1
        assert bytes(alice.raw) != bytes(64)  # eviction drops slots, not the keyring's key

    asyncio.run(run())


# --- the example config ---------------------------------------------------------------------------


def test_example_tenants_config_checks() -> None:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "nbdcrypt", "check", "-c", "configs/tenants.yaml"],
        capture_output=True, text=True, cwd=root, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "    key: per client (the key of the client's rule):\n" in out.stdout
    assert "      alice (aes-256-xts, 4096-byte data units): inline\n" in out.stdout
    assert (
        "clients (first match wins):\n  [0] unix_uid=1000: shared rw, handbook ro; key alice\n"
        in (out.stdout)
    )
    assert out.stdout.endswith("  [3] anonymous: handbook ro\n")


def test_on_idle_eviction_races() -> None:
    """A connection that takes the key up again before the eviction runs keeps it; a keyslot
    held by another export's request (EBUSY) keeps it too, and the server goes on."""

    async def run() -> None:
        alice = make_key("alice")
        dev = engine("a")
        vault = Export("vault", dev, per_client_key=True, evict_on_idle=True)
        other = Export("other", dev, key=alice)
        users = KeyUsers()
        first, second = Holder(), Holder()
        view = vault.open(alice, readonly=False)
        users.join(view, first)
        await program(dev, alice)
        users.left(view, first)  # the eviction is scheduled...
        users.join(vault.open(alice, readonly=False), second)  # ...and the key taken up again
        await asyncio.sleep(0)
        assert dev.holds_key(alice) and dev.stats.evictions == 0
        assert dev.keyslots is not None
        slot = await dev.keyslots.get_slot(alice)  # a request of `other` holds its slot
        users.left(view, second)
        await asyncio.sleep(0)
        assert dev.holds_key(alice) and dev.stats.evictions == 0  # EBUSY: it stays
        dev.keyslots.put_slot(slot)
        assert users.connections(alice) == 0
        assert other.key is alice

    asyncio.run(run())


# --- no clients section gives anything but a ConfigError -----------------------------------------

WORDS = [
    "match",
    "exports",
    "key",
    "anonymous",
    "tls_subject",
    "tls_san",
    "address",
    "unix_uid",
    "unix_gid",
    "vault",
    "demo",
    "plain",
    "oddity",
    "alice",
    "bob",
    "tiny",
    "rw",
    "ro",
]
SCALARS = [
    "anonymous",
    "rw",
    "ro",
    "10.0.0.0/8",
    "10.0.0.1/8",
    "::1",
    "CN=a",
    "DNS:x",
    "IP:1.2.3.4",
    "IP:x",
    "",
    "é",
    "\ud800",
    "alice",
    "vault",
]
_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.sampled_from(SCALARS)
_words = st.sampled_from(WORDS) | st.text(max_size=4)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_words, inner, max_size=3),
    max_leaves=10,
)
_rules = st.lists(st.dictionaries(st.sampled_from(WORDS), _values, max_size=4), max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_rules, _values))
def test_any_clients_section_loads_or_is_a_config_error(section: object) -> None:
    with tempfile.TemporaryDirectory() as name:
        path = Path(name) / "c.yaml"
        path.write_text(BASE + yaml.safe_dump({"clients": section}, allow_unicode=True))
        try:
            config = load_config(path)
        except ConfigError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
        else:
            assert config.clients is not None and config.clients
