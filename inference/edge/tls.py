"""TLS on the gRPC port, and mutual TLS, from PEM files.

The files are checked at start-up with the `cryptography` package, so that a bad file
stops the server with a message naming the option, the file and what is wrong
(unreadable, not PEM, an encrypted key, a key that is not the certificate's, a
certificate expired or not yet valid) instead of a handshake failure on the first call.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

EXPIRY_WARNING = dt.timedelta(days=14)


@dataclass
class TlsOptions:
    cert_file: str = ""            # PEM: the server's certificate, then any intermediates
    key_file: str = ""             # PEM: its private key (not encrypted)
    # PEM: CAs that sign client certificates; set, every client must present a certificate
    # signed by one (mutual TLS). gRPC's Python server cannot ask for a client certificate
    # without requiring it, so there is no "optional" mode: a certificate it did not ask
    # for would go unchecked.
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.key_file or self.client_ca_file)


class TlsError(ValueError):
    """A TLS file or option that cannot be used."""


def _read(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{option} {path}: cannot read: {e.strerror or e}") from None


def _certificates(option: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsError(f"{option} {path}: not a PEM certificate ({e})") from None
    if not certs:
        raise TlsError(f"{option} {path}: holds no certificate")
    return certs


def _check_dates(option: str, path: str, cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    subject = cert.subject.rfc4514_string() or "(no subject)"
    if now >= cert.not_valid_after_utc:
        raise TlsError(f"{option} {path}: {what} {subject} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    if now < cert.not_valid_before_utc:
        raise TlsError(f"{option} {path}: {what} {subject} is not valid before "
                       f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}")
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        log.warning("%s %s: %s %s expires at %s", option, path, what, subject,
                    f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")


def load(options: TlsOptions, now: dt.datetime | None = None) -> tuple[bytes, bytes, bytes | None]:
    """The checked PEM bytes: certificate chain, private key, client CAs (or None)."""
    o = options
    now = now or dt.datetime.now(dt.timezone.utc)
    if not o.cert_file or not o.key_file:
        missing = "--tls-cert" if not o.cert_file else "--tls-key"
        raise TlsError(f"{missing}: missing; TLS needs both --tls-cert and --tls-key")
    chain = _read("--tls-cert", o.cert_file)
    certs = _certificates("--tls-cert", o.cert_file, chain)
    for i, cert in enumerate(certs):
        _check_dates("--tls-cert", o.cert_file, cert, now, "certificate" if i == 0 else "intermediate certificate")
    key_pem = _read("--tls-key", o.key_file)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(f"--tls-key {o.key_file}: the private key is encrypted; give it unencrypted "
                       "(e.g. `openssl pkey -in KEY -out KEY.plain`) and protect the file instead") from None
    except (ValueError, Exception) as e:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise TlsError(f"--tls-key {o.key_file}: not a PEM private key ({e})") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, raw) != certs[0].public_key().public_bytes(enc, raw):
        raise TlsError(f"--tls-key {o.key_file}: is not the private key of the certificate in --tls-cert "
                       f"{o.cert_file} ({certs[0].subject.rfc4514_string()})")
    client_ca = None
    if o.client_ca_file:
        client_ca = _read("--tls-client-ca", o.client_ca_file)
        for cert in _certificates("--tls-client-ca", o.client_ca_file, client_ca):
            _check_dates("--tls-client-ca", o.client_ca_file, cert, now, "CA certificate")
    return chain, key_pem, client_ca


def server_credentials(options: TlsOptions) -> grpc.ServerCredentials:
    chain, key, client_ca = load(options)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)
