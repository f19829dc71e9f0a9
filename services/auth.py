"""API keys: `authorization: Bearer <key>` checked against a mounted file of key hashes.

The file (a Kubernetes Secret mounted read-only) has one `key_id:sha256hex` line per key (`#` comments and blank
lines ignored); only hashes are stored, so the file does not hand out keys. It is re-read when it changes (checked
at most once a second), so keys rotate without a restart; a file that becomes unreadable or malformed keeps the
last good set and logs a warning. The presented key is hashed and compared with every stored hash through
`hmac.compare_digest` (time independent of where the hashes differ). Logs and metrics carry the key id, never the
key. Other endpoints (the realtime gateway's WebSocket) call `authenticate` with the same store.

New key:  python -m moss_speech.services.auth new KEY_ID   (prints the key once, and the line for the file)
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from pathlib import Path

from moss_speech.services.logging import get_logger, key_id_var

log = get_logger("auth")

ANONYMOUS = "anonymous"  # the key id of every caller when auth is "none"
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_KEY_CHARS = 256
RELOAD_CHECK_SECONDS = 1.0

__all__ = ["ANONYMOUS", "ApiKeys", "AuthError", "KeyFileError", "authenticate", "bearer", "hash_key", "key_id_var"]


class AuthError(Exception):
    """Missing or wrong credentials; the message is safe to return to the client."""


class KeyFileError(ValueError):
    """The key file cannot be read or has a malformed line (the message names the line, never a hash)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_file(text: str) -> dict[str, str]:
    """key id -> sha256 hex of the key."""
    keys: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, digest = line.partition(":")
        key_id, digest = key_id.strip(), digest.strip().lower()
        if not sep or not KEY_ID_RE.match(key_id) or not HASH_RE.match(digest):
            raise KeyFileError(f"line {n}: expected `key_id:sha256hex` (id of [A-Za-z0-9_.-], 64 hex digits)")
        if key_id in keys:
            raise KeyFileError(f"line {n}: key id {key_id!r} appears twice")
        keys[key_id] = digest
    return keys


class ApiKeys:
    """The key hashes of a file, reloaded when the file changes."""

    def __init__(self, path: str | Path, clock=time.monotonic) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._hashes: list[tuple[str, bytes]] = []
        self._load(initial=True)

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows the ..data symlink swap of a Secret volume
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def _load(self, initial: bool = False) -> None:
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            keys = parse_key_file(self.path.read_text())
        except (OSError, UnicodeDecodeError, KeyFileError) as e:
            if initial:
                raise KeyFileError(f"API key file {self.path}: {e}") from None
            log.warning("API key file unusable; keeping the previous keys", extra={"fields": {"error": str(e)}})
            return
        self._hashes = [(key_id, bytes.fromhex(digest)) for key_id, digest in keys.items()]
        self._stamp = stamp
        log.info("API keys loaded", extra={"fields": {"keys": len(keys), "key_ids": sorted(keys)}})

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        with self._lock:
            if now >= self._next_check:
                self._next_check = now + RELOAD_CHECK_SECONDS
                self._load()

    def __len__(self) -> int:
        return len(self._hashes)

    def key_id(self, key: str) -> str | None:
        """The id of `key`, or None. Compares against every stored hash, so the time does not depend on which
        (if any) matched."""
        self._maybe_reload()
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for key_id, digest in self._hashes:
            if hmac.compare_digest(presented, digest):
                found = key_id
        return found


def bearer(authorization: str | None) -> str:
    """The key of an `authorization: Bearer <key>` value; raises AuthError."""
    if not authorization:
        raise AuthError("missing credentials: send `authorization: Bearer <API key>`")
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthError("malformed authorization: expected `Bearer <API key>`")
    if len(key) > MAX_KEY_CHARS:
        raise AuthError("invalid API key")
    return key


def authenticate(authorization: str | None, keys: ApiKeys | None) -> str:
    """The caller's key id for an `authorization` header/metadata value; `keys` None = auth off (ANONYMOUS).
    Raises AuthError (-> UNAUTHENTICATED / HTTP 401) for missing, malformed or unknown keys. Reusable by any
    endpoint of the service (the realtime gateway's WebSocket handshake)."""
    if keys is None:
        return ANONYMOUS
    key_id = keys.key_id(bearer(authorization))
    if key_id is None:
        raise AuthError("invalid API key")
    return key_id


def new_key() -> str:
    return "msk_" + secrets.token_urlsafe(32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new", help="print a new key and its line for the key file")
    new.add_argument("key_id")
    args = parser.parse_args(argv)
    if not KEY_ID_RE.match(args.key_id):
        parser.error("key id: 1-64 characters of [A-Za-z0-9_.-]")
    key = new_key()
    print(f"key (give it to the client; it is not stored): {key}")
    print(f"line for the key file: {args.key_id}:{hash_key(key)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
