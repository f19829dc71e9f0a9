"""TLS (and optional mTLS) server credentials whose certificate files are re-read when they change.

grpcio asks the fetcher for a configuration at each new handshake; it returns a new one only when the
certificate, key or client CA file changed (cert-manager rotating a Secret swaps the mounted files), so existing
connections keep their session and new ones get the new certificate without a restart. A rotation caught
half-written (key and certificate not yet a pair) keeps the previous configuration until the next handshake.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import grpc

from moss_speech.services.logging import get_logger

log = get_logger("tls")


class TlsConfigError(ValueError):
    """A missing or unreadable certificate/key file at start-up."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsConfigError(f"{what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {path}: not a PEM file")
    return data


class ReloadingCredentials:
    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.files = [f for f in (cert_file, key_file, client_ca_file) if f]
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._stamp = self._stamps()
        self.reloads = 0
        self._initial = self._config()

    def _stamps(self) -> tuple:
        out = []
        for f in self.files:
            try:
                st = os.stat(f)
                out.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        pair = (_read(self.key_file, "TLS key"), _read(self.cert_file, "TLS certificate"))
        ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        try:  # the key must belong to the certificate (a rotation may be caught between the two writes)
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as e:
            raise TlsConfigError(
                f"TLS certificate {self.cert_file} and key {self.key_file} do not form a usable "
                f"pair ({type(e).__name__})"
            ) from None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stamps()
        if stamp == self._stamp or None in stamp:
            return None
        try:
            config = self._config()
        except TlsConfigError as e:
            log.warning(
                "TLS files changed but cannot be read; keeping the previous ones", extra={"fields": {"error": str(e)}}
            )
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"fields": {"reloads": self.reloads}})
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=bool(self.client_ca_file)
        )
