"""A test PKI made with certtool (gnutls-bin): two CAs, a server certificate, client certificates.

Each client gets a directory laid out as libnbd (`tls-certificates=DIR`) and qemu
(`tls-creds-x509,dir=DIR`) expect it: DIR/ca-cert.pem (the CA that signed the server),
DIR/client-cert.pem and DIR/client-key.pem. Keys are ECDSA P-256 (fast to make) with mode 0600.

- alice: CN=alice,O=tenant A, email SAN, signed by the test CA
- bob: CN=bob,OU=storage,O=tenant B, DNS, IP and URI SANs, signed by the test CA
- mallory: the same subject as alice, but signed by another CA: must be refused
- nocert: only the CA certificate, no client certificate
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CA = "cn = nbdcrypt test CA\norganization = nbdcrypt tests\nca\ncert_signing_key\n"
OTHER_CA = "cn = some other CA\norganization = elsewhere\nca\ncert_signing_key\n"
SERVER = (
    "cn = localhost\norganization = nbdcrypt tests\ndns_name = localhost\n"
    "ip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\n"
)
CLIENT_TAIL = "tls_www_client\nsigning_key\nencryption_key\n"
ALICE = "cn = alice\norganization = tenant A\nemail = alice@example.com\n" + CLIENT_TAIL
BOB = (
    "cn = bob\norganization = tenant B\nunit = storage\ndns_name = bob.example.com\n"
    "ip_address = 10.0.0.2\nuri = spiffe://example.com/bob\n" + CLIENT_TAIL
)
VALID = "expiration_days = 3650\n"
EXPIRED = (
    'activation_date = "2001-01-01 00:00:00 UTC"\nexpiration_date = "2002-01-01 00:00:00 UTC"\n'
)

SUBJECTS = {"alice": "CN=alice,O=tenant A", "bob": "CN=bob,OU=storage,O=tenant B"}


@dataclass(frozen=True)
class Pki:
    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    expired_cert: Path  # for server_key, expired in 2002
    other_ca_cert: Path
    clients: dict[str, Path]  # alice, bob, mallory, nocert -> a tls-certificates directory

    def client_cert(self, name: str) -> Path:
        return self.clients[name] / "client-cert.pem"

    def client_key(self, name: str) -> Path:
        return self.clients[name] / "client-key.pem"


def certtool(*args: str | Path) -> None:
    proc = subprocess.run(
        ["certtool", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"certtool {args} failed:\n{proc.stderr}")


def _key(path: Path) -> Path:
    certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", path)
    path.chmod(0o600)
    return path


def _template(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _self_signed(root: Path, name: str, template: str) -> tuple[Path, Path]:
    key = _key(root / f"{name}-key.pem")
    cert = root / f"{name}-cert.pem"
    info = _template(root / f"{name}.info", template + VALID)
    certtool("--generate-self-signed", "--load-privkey", key, "--template", info, "--outfile", cert)
    return cert, key


def _issue(
    root: Path, name: str, template: str, ca: tuple[Path, Path], key: Path | None = None
) -> tuple[Path, Path]:
    key = key or _key(root / f"{name}-key.pem")
    cert = root / f"{name}-cert.pem"
    info = _template(root / f"{name}.info", template)
    certtool(
        "--generate-certificate", "--load-privkey", key, "--template", info, "--outfile", cert,
        "--load-ca-certificate", ca[0], "--load-ca-privkey", ca[1],
    )  # fmt: skip
    return cert, key


def _client_dir(root: Path, name: str, ca_cert: Path, cert: tuple[Path, Path] | None) -> Path:
    where = root / name
    where.mkdir(mode=0o700)
    (where / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    if cert is not None:
        (where / "client-cert.pem").write_bytes(cert[0].read_bytes())
        key = where / "client-key.pem"
        key.write_bytes(cert[1].read_bytes())
        key.chmod(0o600)
    return where


def make_pki(root: Path) -> Pki:
    ca = _self_signed(root, "ca", CA)
    other = _self_signed(root, "other-ca", OTHER_CA)
    server = _issue(root, "server", SERVER + VALID, ca)
    expired, _ = _issue(root, "expired", SERVER + EXPIRED, ca, key=server[1])
    clients = {
        "alice": _client_dir(root, "alice", ca[0], _issue(root, "c-alice", ALICE + VALID, ca)),
        "bob": _client_dir(root, "bob", ca[0], _issue(root, "c-bob", BOB + VALID, ca)),
        "mallory": _client_dir(
            root, "mallory", ca[0], _issue(root, "c-mallory", ALICE + VALID, other)
        ),
        "nocert": _client_dir(root, "nocert", ca[0], None),
    }
    return Pki(root, ca[0], server[0], server[1], expired, other[0], clients)


def openssl(*args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"openssl {args} failed:\n{proc.stderr}")


def make_openssl_pki(root: Path) -> tuple[Path, Path, Path, Path]:
    """The same kind of PKI with openssl, by the commands docs/TLS.md gives: (CA certificate,
    server certificate, server key, a tls-certificates directory for CN=alice,O=tenant A)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "3650",
        "-subj", "/O=Example/CN=Example NBD CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=root,
    )  # fmt: skip
    leaves = [
        ("server", "/O=Example/CN=localhost", "DNS:localhost, IP:127.0.0.1", "serverAuth"),
        ("alice", "/O=tenant A/CN=alice", "email:alice@example.com", "clientAuth"),
    ]
    for name, subject, sans, usage in leaves:
        (root / f"{name}.ext").write_text(f"subjectAltName = {sans}\nextendedKeyUsage = {usage}\n")
        openssl(
            "req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject,
            cwd=root,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "825", "-extfile", f"{name}.ext",
            "-out", f"{name}-cert.pem",
            cwd=root,
        )  # fmt: skip
    alice = root / "alice"
    alice.mkdir(mode=0o700)
    for source, target in [
        ("ca-cert.pem", "ca-cert.pem"),
        ("alice-cert.pem", "client-cert.pem"),
        ("alice-key.pem", "client-key.pem"),
    ]:
        (alice / target).write_bytes((root / source).read_bytes())
    (alice / "client-key.pem").chmod(0o600)
    return root / "ca-cert.pem", root / "server-cert.pem", root / "server-key.pem", alice
