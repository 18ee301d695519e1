"""TLS credentials for NBD_OPT_STARTTLS, and what a client's certificate says about it.

`server_context` reads and checks the PEM files `server.tls` names (the server's certificate
chain, its private key, the CA certificates client certificates are verified against), says
exactly what is wrong with each (the loader turns that into a located config error), and builds
the ssl.SSLContext every connection upgrades with: TLS 1.2 at least (1.3 when the client has
it), no compression, no renegotiation, client certificates verified against the CA. OpenSSL
parses the key and checks it against the certificate, as it will when serving; `cryptography`
reads the certificates' names and dates. `peer_names` reads the subject and subjectAltNames of
a verified client certificate, which client rules match on.

The private key is read through one descriptor, checked as ssh checks identity files (a regular
file that neither group nor others may access) and handed to OpenSSL as /proc/self/fd/N, so the
file checked is the file loaded. Its bytes never reach a message, a log or a repr.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from nbdcrypt.config.model import ClientCertificate, TlsConfig, TlsMode

MAX_PEM_FILE = 1 << 20  # a certificate bundle larger than this is not a certificate bundle

_VERIFY = {
    ClientCertificate.REQUIRED: ssl.CERT_REQUIRED,
    ClientCertificate.OPTIONAL: ssl.CERT_OPTIONAL,
    ClientCertificate.NONE: ssl.CERT_NONE,
}
_KEY_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----")


class TlsFileError(Exception):
    """A TLS file can't be used. `key` is the `server.tls` key that names it; the message names
    the file and says why, never what a private key holds."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"server.tls.{self.key}: {self.message}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the checked files hold, for `nbdcrypt check` and the startup log (public parts)."""

    subject: str  # the server certificate's subject, RFC 4514
    sans: tuple[str, ...]  # its subjectAltNames, as peer_names gives them
    not_after: datetime.datetime  # when it expires (UTC)
    ca_subjects: tuple[str, ...]  # the subjects of the CA certificates, in file order


# Reading the files ----------------------------------------------------------------------------


def _open(key: str, path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TlsFileError(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TlsFileError(key, f"{path} is not a regular file")
        if st.st_size > MAX_PEM_FILE:
            raise TlsFileError(key, f"{path} is {st.st_size} bytes, too large for a PEM file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_fd(key: str, path: Path, fd: int) -> bytes:
    try:
        data = os.pread(fd, MAX_PEM_FILE + 1, 0)
    except OSError as exc:
        raise TlsFileError(key, f"cannot read {path}: {exc.strerror}") from None
    if not data.strip():
        raise TlsFileError(key, f"{path} is empty")
    return data


def _read_public(key: str, path: Path) -> bytes:
    fd = _open(key, path)
    try:
        return _read_fd(key, path, fd)
    finally:
        os.close(fd)


def _open_private(path: Path) -> int:
    """The private key file, opened and checked; refused if its group or others may access it."""
    fd = _open("private_key", path)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        os.close(fd)
        raise TlsFileError(
            "private_key",
            f"{path} is accessible by others (mode {mode:04o}); a private key must be "
            f"private: chmod 600 {path}",
        )
    return fd


def _certificates(key: str, path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(
            key, f"{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ) from None


def _check_key_pem(path: Path, data: bytes) -> None:
    """A PEM private key, unencrypted (OpenSSL parses it; this only makes its errors clear)."""
    block = _KEY_BLOCK.search(data)
    if block is None:
        raise TlsFileError(
            "private_key", f"{path} holds no PEM private key (expected -----BEGIN PRIVATE KEY-----)"
        )
    if b"ENCRYPTED" in block[1] or b"Proc-Type: 4,ENCRYPTED" in data:
        raise TlsFileError(
            "private_key",
            f"{path} is encrypted; give the key unencrypted, protected by its file mode "
            f"(openssl pkey -in {path.name} -out PLAIN.pem, then chmod 600 PLAIN.pem)",
        )


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _check_dates(path: Path, leaf: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        raise TlsFileError(
            "certificate",
            f"{path} ({_subject(leaf)}) expired on {leaf.not_valid_after_utc:%Y-%m-%d}",
        )
    if leaf.not_valid_before_utc > now:
        raise TlsFileError(
            "certificate",
            f"{path} ({_subject(leaf)}) is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)",
        )


def _no_passphrase() -> bytes:
    raise TlsFileError("private_key", "the private key asks for a passphrase")


def _context(
    cfg: TlsConfig, key_fd: int, leaf: x509.Certificate, ca_pem: bytes | None
) -> ssl.SSLContext:
    """The server context: TLS 1.2 at least, no compression or renegotiation, the server's
    certificate and key (OpenSSL checks that they match), the CA if clients show certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(cfg.certificate), f"/proc/self/fd/{key_fd}", _no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = (
                f"{cfg.private_key} does not match the certificate in {cfg.certificate} "
                f"({_subject(leaf)})"
            )
        else:
            reason = exc.reason or exc.strerror
            message = f"OpenSSL cannot use {cfg.private_key} with {cfg.certificate}: {reason}"
        raise TlsFileError("private_key", message) from None
    if ca_pem is not None and cfg.client_certificate is not ClientCertificate.NONE:
        try:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise TlsFileError(
                "ca", f"OpenSSL cannot use {cfg.ca}: {exc.reason or exc.strerror}"
            ) from None
    ctx.verify_mode = _VERIFY[cfg.client_certificate]
    return ctx


def server_context(cfg: TlsConfig) -> tuple[ssl.SSLContext, Credentials]:
    """Read and check the files of an enabled `server.tls` (TlsFileError says what is wrong with
    which), and build the context connections upgrade with on NBD_OPT_STARTTLS."""
    if cfg.mode is TlsMode.OFF or cfg.certificate is None or cfg.private_key is None:
        raise ValueError("TLS is off: there are no credentials to load")
    chain = _certificates(
        "certificate", cfg.certificate, _read_public("certificate", cfg.certificate)
    )
    leaf = chain[0]
    _check_dates(cfg.certificate, leaf)
    ca_pem: bytes | None = None
    ca_subjects: tuple[str, ...] = ()
    if cfg.ca is not None:
        ca_pem = _read_public("ca", cfg.ca)
        ca_subjects = tuple(_subject(c) for c in _certificates("ca", cfg.ca, ca_pem))
    fd = _open_private(cfg.private_key)
    try:
        _check_key_pem(cfg.private_key, _read_fd("private_key", cfg.private_key, fd))
        ctx = _context(cfg, fd, leaf, ca_pem)
    finally:
        os.close(fd)
    return ctx, Credentials(_subject(leaf), _alt_names(leaf), leaf.not_valid_after_utc, ca_subjects)


def check_credentials(cfg: TlsConfig) -> Credentials:
    """What `server_context` checks, for the config loader and `nbdcrypt check`."""
    return server_context(cfg)[1]


# The client's certificate ---------------------------------------------------------------------


def _alt_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = []
    for name in ext.value:
        if isinstance(name, x509.DNSName):
            names.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            names.append(f"IP:{name.value}")
        elif isinstance(name, x509.RFC822Name):
            names.append(f"email:{name.value}")
        elif isinstance(name, x509.UniformResourceIdentifier):
            names.append(f"URI:{name.value}")
    return tuple(names)


def peer_names(der: bytes | None) -> tuple[str | None, tuple[str, ...]]:
    """(subject in RFC 4514, subjectAltNames) of a verified client certificate in DER, or
    (None, ()) when the client showed none. ValueError if it does not parse."""
    if der is None:
        return None, ()
    cert = x509.load_der_x509_certificate(der)
    return _subject(cert), _alt_names(cert)


def describe_tls_error(exc: BaseException) -> str:
    """One line on why a TLS handshake failed, for the log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or type(exc).__name__)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
