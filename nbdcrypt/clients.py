"""Client rules: who a connection is decides which exports it sees and opens, and with which key.

`clients:` in the config is an ordered list of rules; the first rule whose `match` holds for a
connection's identity (nbdcrypt.server.identity.PeerIdentity) decides, and a connection that no
rule matches may open nothing. Without `clients:`, anyone may open every export with the
export's own key, as before client rules existed.

`ExportAccess` applies the rules to a server's exports: what NBD_OPT_LIST shows a client, and
the view of an export (`OpenExport`: its key context, read-only or not) that NBD_OPT_INFO, GO
and EXPORT_NAME hand a connection. An export a client may not open is answered exactly like an
export that does not exist, so a client cannot learn the names of other tenants' exports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING

from nbdcrypt.config.model import ClientMatch, ClientRule
from nbdcrypt.server.identity import PeerIdentity

if TYPE_CHECKING:
    from nbdcrypt.blkcrypto.key import CryptoKey
    from nbdcrypt.export import Export, OpenExport

SAN_KINDS = ("DNS", "IP", "email", "URI")
_SAN_KIND = {kind.lower(): kind for kind in SAN_KINDS}


def canonical_san(text: str) -> str:
    """A subjectAltName `TYPE:VALUE` as rules compare it: the type spelled as in SAN_KINDS,
    DNS names in lower case (DNS is case-insensitive), IP addresses in their compressed form."""
    kind, sep, value = text.partition(":")
    canonical = _SAN_KIND.get(kind.lower())
    if not sep or canonical is None or not value:
        raise ValueError(
            f"expected a subjectAltName as TYPE:VALUE with TYPE one of {', '.join(SAN_KINDS)} "
            f"(such as DNS:alice.example.com), got {text[:60]!r}"
        )
    if canonical == "DNS":
        value = value.lower()
    elif canonical == "IP":
        try:
            value = str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"invalid IP address {value[:60]!r} in a subjectAltName") from None
    return f"{canonical}:{value}"


def _canonical_or_raw(text: str) -> str:
    try:
        return canonical_san(text)
    except ValueError:
        return text


def _peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address; an IPv4-mapped IPv6 address (a dual-stack listener) as IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def matches(match: ClientMatch, identity: PeerIdentity) -> bool:
    """Whether every criterion of `match` holds for `identity` (`anonymous`: anyone)."""
    if match.anonymous:
        return True
    checks = (
        match.tls_subject is None or (identity.tls and identity.tls_subject == match.tls_subject),
        match.tls_san is None or (identity.tls and match.tls_san in _sans(identity)),
        match.address is None or _in_network(identity, match.address),
        match.unix_uid is None or (identity.transport == "unix" and identity.uid == match.unix_uid),
        match.unix_gid is None or (identity.transport == "unix" and identity.gid == match.unix_gid),
    )
    return all(checks)


def _sans(identity: PeerIdentity) -> list[str]:
    return [_canonical_or_raw(san) for san in identity.tls_sans]


def _in_network(identity: PeerIdentity, network: IPv4Network | IPv6Network) -> bool:
    if identity.transport != "tcp" or not identity.address:
        return False
    ip = _peer_ip(identity.address)
    return ip is not None and ip in network


def first_match(rules: Sequence[ClientRule], identity: PeerIdentity) -> ClientRule | None:
    """The rule that decides for `identity`: the first that matches, or None."""
    return next((rule for rule in rules if matches(rule.match, identity)), None)


def describe_match(match: ClientMatch) -> str:
    """The match as `check` prints it: `unix_uid=1000`, `tls_subject="CN=alice"`, ..."""
    if match.anonymous:
        return "anonymous"
    parts = []
    if match.tls_subject is not None:
        parts.append(f"tls_subject={match.tls_subject!r}")
    if match.tls_san is not None:
        parts.append(f"tls_san={match.tls_san!r}")
    if match.address is not None:
        parts.append(f"address={match.address}")
    if match.unix_uid is not None:
        parts.append(f"unix_uid={match.unix_uid}")
    if match.unix_gid is not None:
        parts.append(f"unix_gid={match.unix_gid}")
    return " ".join(parts)


def describe_rule(rule: ClientRule) -> str:
    """One line of `check`: `[0] unix_uid=1000: vault rw, demo ro; key bob`."""
    grants = ", ".join(f"{name} {'ro' if ro else 'rw'}" for name, ro in rule.exports.items())
    key = f"; key {rule.key}" if rule.key is not None else ""
    return f"[{rule.index}] {describe_match(rule.match)}: {grants}{key}"


class ExportAccess:
    """The exports of a server as each client may see and open them.

    `rules` is None when the config has no `clients:` section: then every client sees every
    export and opens it with the export's own key, read-only only if the export is.
    """

    def __init__(
        self,
        exports: Mapping[str, Export],
        default_export: str | None,
        rules: Sequence[ClientRule] | None,
        keys: Mapping[str, CryptoKey],
    ) -> None:
        self.exports = exports
        self.default_export = default_export
        self.rules = tuple(rules) if rules is not None else None
        self.keys = keys

    def find(self, name: str) -> Export | None:
        """The export `name` names (the empty name: the default export), allowed or not."""
        if name == "" and self.default_export is not None:
            name = self.default_export
        return self.exports.get(name)

    def rule_for(self, identity: PeerIdentity) -> ClientRule | None:
        return first_match(self.rules, identity) if self.rules is not None else None

    def listed(self, identity: PeerIdentity) -> list[Export]:
        """What NBD_OPT_LIST shows this client: the exports it may open, in config order."""
        if self.rules is None:
            return list(self.exports.values())
        rule = self.rule_for(identity)
        if rule is None:
            return []
        return [export for name, export in self.exports.items() if name in rule.exports]

    def open(self, identity: PeerIdentity, name: str) -> OpenExport | None:
        """The view of export `name` this client gets, or None if there is no such export or
        its rule does not grant it (the two look the same to the client)."""
        export = self.find(name)
        if export is None:
            return None
        if self.rules is None:
            return export.open(export.key, readonly=export.readonly)
        rule = self.rule_for(identity)
        if rule is None or export.name not in rule.exports:
            return None
        key = export.key
        if export.per_client_key:
            assert rule.key is not None  # the loader refuses a rule without one
            key = self.keys[rule.key]
        return export.open(key, readonly=rule.exports[export.name], rule=rule.index)
