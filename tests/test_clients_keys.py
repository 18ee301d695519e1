"""Per-connection key contexts and client rules, through real clients (nbdinfo, nbdsh, nbdcopy,
libnbd) and `nbdcrypt ctl`.

Tenants on one export are told apart by the unix socket's peer credentials: one client runs as
root, the other under another uid (setpriv), on a socket in a directory every uid can reach.
What is promised (docs/CLIENTS.md): each tenant reads back its own data; what one wrote reads
through the other's context as the other key's decryption of the ciphertext, never as the
plaintext; the backing file holds ciphertext only; a client sees only the exports its rule
grants, read-only where the rule says so; keys leave the engines on idle or on demand, and
`ctl evict-key` fails with EBUSY while a request using the key is in flight.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import nbdwire as nw
import pytest
from clients import rawnbd as rn
from clients.util import release, xts
from conftest import ROOT, StartServer, require_tool, run

MiB = 1024 * 1024
NOBODY = 65534
SYSTEM_PATH = {"PATH": "/usr/bin:/bin:" + os.environ.get("PATH", "")}  # nbdsh runs `python3`


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any uid can reach, for a unix socket other users may connect to (pytest's
    own temporary directories are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="nbdcrypt-tenants-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve_shared(start_server: StartServer, config: str, shared: Path, *extra: str) -> str:
    """Start a server that also listens on shared/nbd.sock (mode 0666); its socket path."""
    sock = shared / "nbd.sock"
    start_server(config, "--listen", f"unix://{sock}", *extra)
    sock.chmod(0o666)
    return str(sock)


def uri(sock: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def as_user(uid: int, cmd: list[str]) -> list[str]:
    return [require_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]


def nbdsh(
    uri_: str, script: str, *, uid: int = 0, data: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """nbdsh connected to uri_ running `script` (h is the handle), as user `uid`."""
    cmd = [require_tool("nbdsh"), "-u", uri_, "-c", "import sys", "-c", script]
    proc = subprocess.run(
        as_user(uid, cmd) if uid else cmd,
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, **SYSTEM_PATH},
    )
    if check and proc.returncode:
        raise AssertionError(f"nbdsh {script!r} as uid {uid}: {proc.returncode}\n{proc.stderr!r}")
    return proc


def pwrite(uri_: str, offset: int, data: bytes, *, uid: int = 0) -> None:
    nbdsh(uri_, f"h.pwrite(sys.stdin.buffer.read(), {offset}); h.flush()", uid=uid, data=data)


def pread(uri_: str, offset: int, length: int, *, uid: int = 0) -> bytes:
    script = f"sys.stdout.buffer.write(h.pread({length}, {offset}))"
    return nbdsh(uri_, script, uid=uid).stdout


def ctl(control: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdcrypt", "ctl", "-s", str(control), *args]
    return run(cmd, cwd=ROOT, check=check)


def keyslots(control: Path, device: str) -> tuple[int, int, int]:
    """(hits, programs, evictions) of a device's keyslots, from `ctl info`."""
    info = ctl(control, "info", device).stdout
    found = re.search(r"Keyslots: +\d+: (\d+) hits, (\d+) programs, (\d+) evictions", info)
    assert found is not None, info
    return int(found[1]), int(found[2]), int(found[3])


def wait_for(what: str, check: object, timeout: float = 60.0) -> None:
    """Wait until check() is true (the server reacts to a client's close asynchronously)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s: {what}")
        time.sleep(0.05)


# --- two tenants, one export, two keys -----------------------------------------------------------

TWO_TENANTS = f"""\
keys:
  alice: {{mode: aes-256-xts, data_unit_size: 4096, source: {{file: keys/alice.key, create: true}}}}
  bob: {{mode: aes-256-xts, data_unit_size: 512, source: {{file: keys/bob.key, create: true}}}}
devices:
  disk:
    file: disk.img
    size: 16M
    inline_crypto: {{keyslots: 1, modes: {{aes-256-xts: [4096]}}, max_dun_bytes: 8}}
exports:
  vault: {{device: disk, encryption: per-client, description: "one export, a key per tenant"}}
clients:
  - {{match: {{unix_uid: 0}}, exports: {{vault: rw}}, key: alice}}
  - {{match: {{unix_uid: {NOBODY}}}, exports: {{vault: rw}}, key: bob}}
"""


def test_two_tenants_one_export_two_keys(
    tmp_path: Path, start_server: StartServer, shared_dir: Path
) -> None:
    sock = serve_shared(start_server, TWO_TENANTS, shared_dir)
    vault = uri(sock, "vault")
    mine = (b"alice's plaintext, block by block " * 40000)[:MiB]  # every byte is checked
    theirs = (b"bob wrote this, not alice! " * 40000)[:MiB]
    at_a, at_b = 0, 2 * MiB
    pwrite(vault, at_a, mine)  # root: key alice (4096-byte units, inline in the engine)
    pwrite(vault, at_b, theirs, uid=NOBODY)  # nobody: key bob (512-byte units, the fallback)

    assert pread(vault, at_a, len(mine)) == mine
    assert pread(vault, at_b, len(theirs), uid=NOBODY) == theirs
    crossed_a = pread(vault, at_b, len(theirs))  # root reads bob's blocks through key alice
    crossed_b = pread(vault, at_a, len(mine), uid=NOBODY)  # and the other way round
    assert crossed_a != theirs and crossed_b != mine

    key_a = (tmp_path / "keys" / "alice.key").read_bytes()
    key_b = (tmp_path / "keys" / "bob.key").read_bytes()
    disk = (tmp_path / "disk.img").read_bytes()
    cipher_a, cipher_b = disk[at_a : at_a + len(mine)], disk[at_b : at_b + len(theirs)]
    # On disk: exactly each plaintext under its own key, DUN = offset / data unit size.
    assert cipher_a == xts(key_a, 4096, at_a, mine, encrypt=True)
    assert cipher_b == xts(key_b, 512, at_b, theirs, encrypt=True)
    # Across tenants: the other's ciphertext, decrypted with the reader's key.
    assert crossed_a == xts(key_a, 4096, at_b, cipher_b, encrypt=False)
    assert crossed_b == xts(key_b, 512, at_a, cipher_a, encrypt=False)
    for text in (mine, theirs):
        assert text[:32] not in disk and text[4096:4128] not in disk

    # Each connection advertises its own key's data unit as the minimum block size.
    info = run([require_tool("nbdinfo"), "--json", vault]).stdout
    assert '"block_size_minimum": 4096' in info
    their_info = run(as_user(NOBODY, [require_tool("nbdinfo"), "--json", vault])).stdout
    assert '"block_size_minimum": 512' in their_info
    log = (tmp_path / "nbdcrypt.log").read_text()
    assert re.search(r"unix uid=0 pid=\d+ opened export 'vault' with key alice \(read-write", log)
    assert re.search(rf"unix uid={NOBODY} pid=\d+ closed export 'vault' \(key bob\) after", log)
    assert key_a.hex() not in log and key_b.hex() not in log


def test_unmatched_uid_sees_nothing(start_server: StartServer, shared_dir: Path) -> None:
    sock = serve_shared(start_server, TWO_TENANTS, shared_dir)
    listed = run(as_user(1234, [require_tool("nbdinfo"), "--list", uri(sock, "")]))
    assert "vault" not in listed.stdout
    refused = run(as_user(1234, [require_tool("nbdinfo"), uri(sock, "vault")]), check=False)
    assert refused.returncode != 0 and "vault" not in refused.stdout
    unknown = run(as_user(1234, [require_tool("nbdinfo"), uri(sock, "nosuch")]), check=False)
    assert refused.stderr.replace("vault", "nosuch") == unknown.stderr  # alike: no hint


# --- rules by peer address over TCP: listing, read-only grants, refusals --------------------------

ADDRESS_RULES = """\
devices:
  d: {memory: 16M}
  s: {memory: 1M}
exports:
  public: {device: d, description: "read-only from the loopback"}
  lab: {device: d, description: "read-write from the loopback"}
  secret: {device: s, description: "the 10/8 network only"}
clients:
  - {match: {address: 10.0.0.0/8}, exports: {secret: rw, public: rw}}
  - {match: {address: 127.0.0.0/8}, exports: {public: ro, lab: rw}}
  - {match: {unix_uid: 0}, exports: {lab: ro}}
"""


def test_address_rules_list_open_refuse(start_server: StartServer) -> None:
    server = start_server(ADDRESS_RULES)
    nbdinfo = require_tool("nbdinfo")
    listed = run([nbdinfo, "--list", f"nbd://127.0.0.1:{server.port}"]).stdout
    assert re.findall(r'^export="([^"]*)"', listed, re.M) == ["public", "lab"]
    assert "read-only from the loopback" in listed and "10/8" not in listed
    over_unix = run([nbdinfo, "--list", server.uri("")]).stdout
    assert re.findall(r'^export="([^"]*)"', over_unix, re.M) == ["lab"]

    public = run([nbdinfo, "--json", server.uri("public", tcp=True)]).stdout
    lab = run([nbdinfo, "--json", server.uri("lab", tcp=True)]).stdout
    assert '"is_read_only": true' in public and '"can_trim": false' in public
    assert '"is_read_only": false' in lab
    unix_lab = run([nbdinfo, "--json", server.uri("lab")]).stdout
    assert '"is_read_only": true' in unix_lab  # the same export, read-only by this rule

    # a write the client is made to send anyway is refused by the server with EPERM
    script = (
        "h.set_strict_mode(0)\n"
        f"h.connect_uri({server.uri('public', tcp=True)!r})\n"
        "try:\n    h.pwrite(b'x' * 4096, 0)\nexcept nbd.Error as e:\n    print('errno', e.errno)\n"
        "else:\n    print('written')\n"
    )
    out = run([require_tool("nbdsh"), "-c", script], env={**os.environ, **SYSTEM_PATH}).stdout
    assert out.strip() == "errno EPERM"
    assert run([require_tool("nbdsh"), "-u", server.uri("lab", tcp=True), "-c",
                "h.pwrite(b'y' * 4096, 0); assert h.pread(4096, 0) == b'y' * 4096"],
               env={**os.environ, **SYSTEM_PATH}).returncode == 0  # fmt: skip

    # the 10/8 network's export: refused exactly like an export that does not exist
    secret = run([nbdinfo, server.uri("secret", tcp=True)], check=False)
    nosuch = run([nbdinfo, server.uri("nosuch", tcp=True)], check=False)
    assert secret.returncode != 0 and "No such file or directory" in secret.stderr
    assert secret.stderr.replace("secret", "nosuch") == nosuch.stderr
    copy = run([require_tool("nbdcopy"), server.uri("secret", tcp=True), "-"], check=False)
    assert copy.returncode != 0
    assert "may not open 'secret': no client rule grants it" in server.log
    assert server.stop() == 0


def test_address_rules_on_the_wire(start_server: StartServer) -> None:
    """What each option answers, byte for byte: LIST filtered, INFO/GO/meta-context of an
    export the rule does not grant is ERR_UNKNOWN, and EXPORT_NAME of one closes the session."""
    server = start_server(ADDRESS_RULES)
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        c.opt_structured_reply()
        assert c.opt_list() == [
            ("public", "read-only from the loopback"),
            ("lab", "read-write from the loopback"),
        ]
        for ask in (lambda: c.opt_info("secret"), lambda: c.meta_context("secret", ("base:",))):
            with pytest.raises(rn.OptError) as refused:
                ask()
            assert refused.value.reply.type == nw.REP_ERR_UNKNOWN
        assert c.opt_info("public").flags & nw.READ_ONLY
        assert not c.opt_go("lab").flags & nw.READ_ONLY
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        c.send_option(nw.OPT_EXPORT_NAME, b"secret")
        assert c.wait_closed() == b""
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        assert c.export_name("public")[1] & nw.READ_ONLY
    assert server.stop() == 0


# --- eviction -------------------------------------------------------------------------------------

ENGINE = "{keyslots: 2, modes: {aes-256-xts: [512, 4096]}, max_dun_bytes: 8}"
EVICTION = f"""\
keys:
  alice: {{mode: aes-256-xts, data_unit_size: 4096, source: {{file: alice.key, create: true}}}}
  bob: {{mode: aes-256-xts, data_unit_size: 4096, source: {{file: bob.key, create: true}}}}
devices:
  a: {{file: a.img, size: 16M, inline_crypto: {ENGINE}}}
  pool: {{table: ["0 32768 linear a 0"]}}
exports:
  idle: {{device: pool, key: alice, evict: on-idle}}
  kept: {{device: a, key: bob}}
"""


def test_on_idle_eviction_and_evict_key(tmp_path: Path, start_server: StartServer) -> None:
    control = tmp_path / "control.sock"
    server = start_server(EVICTION, "--control", str(control))
    assert keyslots(control, "a") == (0, 0, 0)
    pwrite(server.uri("idle"), 0, b"a" * 8192)  # one connection: programs alice, then leaves
    wait_for("alice evicted on idle", lambda: keyslots(control, "a")[2] == 1)
    assert keyslots(control, "a")[1] == 1
    assert "key alice evicted from the engines below export 'idle'" in server.log
    assert (
        ctl(control, "evict-key", "alice").stdout == "alice: not programmed in any inline engine\n"
    )

    pwrite(server.uri("kept"), 8192, b"b" * 8192)  # evict: never: bob stays programmed
    wait_for("the kept connection closed", lambda: "closed export 'kept'" in server.log)
    assert keyslots(control, "a")[1:] == (2, 1)
    assert ctl(control, "evict-key", "bob").stdout == "bob: evicted from a\n"
    assert keyslots(control, "a")[1:] == (2, 2)
    assert ctl(control, "evict-key", "bob").stdout == "bob: not programmed in any inline engine\n"

    # evicted keys are programmed again on demand: the data reads back
    assert pread(server.uri("idle"), 0, 8192) == b"a" * 8192
    assert pread(server.uri("kept"), 8192, 8192) == b"b" * 8192
    unknown = ctl(control, "evict-key", "carol", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr == "nbdcrypt ctl: evict-key: unknown key 'carol' (keys: alice, bob)\n"
    assert server.stop() == 0


def test_evict_key_is_busy_while_a_request_is_in_flight(
    tmp_path: Path, start_server: StartServer
) -> None:
    control = tmp_path / "control.sock"
    server = start_server(EVICTION, "--control", str(control))
    h = nbd.NBD()
    h.connect_uri(server.uri("idle"))
    try:
        h.pwrite(b"1" * 4096, 0)  # alice is programmed into a keyslot of a
        ctl(control, "suspend", "pool")
        cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"2" * 4096)), 4096)
        busy: list[str] = []

        def refused() -> bool:  # until the write is held at pool's door, eviction succeeds
            out = ctl(control, "evict-key", "alice", check=False)
            busy.append(out.stderr)
            return out.returncode == 1

        wait_for("evict-key refused with EBUSY", refused)
        assert busy[-1] == (
            "nbdcrypt ctl: evict-key alice: key alice is in use (1 request(s) in flight on 1 "
            "connection(s) using it) (EBUSY); nothing evicted\n"
        )
        assert not h.aio_command_completed(cookie)
        ctl(control, "resume", "pool")
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        out = ctl(control, "evict-key", "alice").stdout
        assert out == (
            "alice: evicted from a; 1 connection(s) using it program it again at their next "
            "request\n"
        )
        assert h.pread(8192, 0) == b"1" * 4096 + b"2" * 4096  # programmed again, same data
    finally:
        release(h)
    wait_for("alice evicted on idle", lambda: "its last connection closed" in server.log)
    assert server.stop() == 0
