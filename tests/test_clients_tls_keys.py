"""Client rules on TLS identities, end to end: two client certificates pick two keys on one
export; a TLS client without a certificate, and a plain one, fall to the anonymous rule.

The certificates come from tests/tlscerts.py (certtool): alice is matched by her certificate's
subject, bob by a DNS subjectAltName of his. libnbd connects with `nbds://...?tls-certificates=`.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from conftest import RunningServer, StartServer, require_tool, run
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from tlscerts import SUBJECTS, Pki

MiB = 1024 * 1024
SYSTEM_PATH = {"PATH": "/usr/bin:/bin:" + os.environ.get("PATH", "")}  # nbdsh runs `python3`


def config(pki: Pki) -> str:
    return f"""\
server:
  tls:
    mode: allow
    certificate: {pki.server_cert}
    private_key: {pki.server_key}
    ca: {pki.ca_cert}
    client_certificate: optional
keys:
  alice: {{mode: aes-256-xts, data_unit_size: 4096, source: {{file: alice.key, create: true}}}}
  bob: {{mode: aes-256-xts, data_unit_size: 512, source: {{file: bob.key, create: true}}}}
devices:
  disk: {{file: disk.img, size: 16M}}
exports:
  vault: {{device: disk, encryption: per-client}}
  demo: {{device: disk, readonly: true, description: for anyone}}
clients:
  - match: {{tls_subject: "{SUBJECTS["alice"]}"}}
    exports: {{vault: rw, demo: ro}}
    key: alice
  - match: {{tls_san: "DNS:Bob.Example.com"}}
    exports: {{vault: rw}}
    key: bob
  - match: anonymous
    exports: {{demo: ro}}
"""


def nbds(server: RunningServer, certs: Path, export: str) -> str:
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={certs}"


def nbdsh(uri: str, script: str, data: bytes = b"") -> bytes:
    connect = f"import sys; h.set_uri_allow_local_file(True); h.connect_uri({uri!r})"
    cmd = [require_tool("nbdsh"), "-c", connect, "-c", script]
    env = {**os.environ, **SYSTEM_PATH}
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def xts(key: bytes, unit: int, offset: int, data: bytes) -> bytes:
    out = b""
    for at in range(0, len(data), unit):
        tweak = ((offset + at) // unit).to_bytes(16, "little")
        out += (
            Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor().update(data[at : at + unit])
        )
    return out


def exports_listed(uri: str) -> list[str]:
    listed = run([require_tool("nbdinfo"), "--list", uri]).stdout
    return re.findall(r'^export="([^"]*)"', listed, re.M)


def test_certificates_pick_keys(tmp_path: Path, start_server: StartServer, pki: Pki) -> None:
    server = start_server(config(pki))
    alice, bob = pki.clients["alice"], pki.clients["bob"]
    mine, theirs = os.urandom(MiB), os.urandom(MiB)
    write = "h.pwrite(sys.stdin.buffer.read(), {}); h.flush()"
    nbdsh(nbds(server, alice, "vault"), write.format(0), mine)
    nbdsh(nbds(server, bob, "vault"), write.format(2 * MiB), theirs)
    read = "sys.stdout.buffer.write(h.pread({}, {}))"
    assert nbdsh(nbds(server, alice, "vault"), read.format(MiB, 0)) == mine
    assert nbdsh(nbds(server, bob, "vault"), read.format(MiB, 2 * MiB)) == theirs
    assert nbdsh(nbds(server, bob, "vault"), read.format(MiB, 0)) != mine
    disk = (tmp_path / "disk.img").read_bytes()
    key_a, key_b = (tmp_path / "alice.key").read_bytes(), (tmp_path / "bob.key").read_bytes()
    assert disk[:MiB] == xts(key_a, 4096, 0, mine)
    assert disk[2 * MiB : 3 * MiB] == xts(key_b, 512, 2 * MiB, theirs)

    assert exports_listed(nbds(server, alice, "")) == ["vault", "demo"]
    assert exports_listed(nbds(server, bob, "")) == ["vault"]
    assert exports_listed(nbds(server, pki.clients["nocert"], "")) == ["demo"]  # TLS, no cert
    assert exports_listed(f"nbd://127.0.0.1:{server.port}") == ["demo"]  # no TLS at all
    refused = run(
        [require_tool("nbdinfo"), nbds(server, pki.clients["nocert"], "vault")], check=False
    )
    assert refused.returncode != 0 and "No such file or directory" in refused.stderr
    assert f"tls({SUBJECTS['alice']})" in server.log
    assert re.search(
        r"tls\(CN=bob,OU=storage,O=tenant B\) opened export 'vault' with key bob", server.log
    )
    assert server.stop() == 0
