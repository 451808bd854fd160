"""API keys: who may open sessions, and how many each.

Keys come from any of three sources, merged (each key has a name, used in logs, metrics
and per-key limits; the key itself is never logged):

* the environment: ``OSUM_API_KEYS="alice:k1,bob:k2"`` (a bare ``k3`` is named ``key-<n>``);
* a file (``--api-keys-file``): one ``name key`` or bare ``key`` per line, ``#`` comments;
* Redis: the hash ``osum:api_keys`` mapping key -> name, looked up on each new session,
  so keys can be added or revoked on a running fleet without a restart.

Credentials on the wire (the first one found is used):

* gRPC metadata ``authorization: Bearer <key>``;
* HTTP ``Authorization: Bearer <key>`` (also ``Token <key>``, as Deepgram);
* for browsers, which cannot set headers on a WebSocket: the query parameter
  ``token=<key>``, or the subprotocol list ``["token", "<key>"]`` (``Sec-WebSocket-Protocol``;
  the server answers with the subprotocol ``token``).

With no key configured anywhere, auth is off (local use) and :func:`Authenticator.describe`
says so for the log. ``--auth required`` refuses to start without keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osum.errors import InvalidConfigError, OsumError

__all__ = ["Authenticator", "Principal", "UnauthenticatedError", "ANONYMOUS", "parse_keys", "credential_from"]

REDIS_KEYS_HASH = "osum:api_keys"


class UnauthenticatedError(OsumError):
    code = "unauthenticated"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name (``anonymous`` when auth is off)."""

    name: str


ANONYMOUS = Principal("anonymous")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, sep: str = ",") -> dict[str, str]:
    """``name:key`` / ``name key`` / bare ``key`` entries -> {key: name}. Raises InvalidConfigError."""
    out: dict[str, str] = {}
    entries = text.split(sep) if sep != "\n" else text.splitlines()
    for n, raw in enumerate(entries):
        entry = raw.split("#", 1)[0].strip() if sep == "\n" else raw.strip()
        if not entry:
            continue
        parts = entry.replace(":", " ", 1).split() if sep != "\n" else entry.split()
        if len(parts) == 1:
            name, key = f"key-{len(out) + 1}", parts[0]
        elif len(parts) == 2:
            name, key = parts
        else:
            raise InvalidConfigError(f"API key entry {n + 1}: expected 'name key' or 'key'")
        if len(key) < 16:
            raise InvalidConfigError(f"API key {name!r} is shorter than 16 characters")
        out[key] = name
    return out


class Authenticator:
    """Checks credentials against the configured keys (constant-time, on sha256 digests)."""

    def __init__(self, keys: Mapping[str, str] | None = None, redis: Any = None, required: bool = False) -> None:
        self._keys = {_digest(k): name for k, name in (keys or {}).items()}
        self._redis = redis  # a redis.asyncio client, or None
        self.enabled = bool(self._keys) or redis is not None or required
        if required and not self._keys and redis is None:
            raise InvalidConfigError("auth is required but no API keys are configured")

    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None, file: Path | None = None, redis: Any = None,
                     mode: str = "auto") -> Authenticator:  # fmt: skip
        """``mode``: ``auto`` (on when keys exist), ``required`` or ``off``."""
        if mode not in ("auto", "required", "off"):
            raise InvalidConfigError(f"auth mode must be auto, required or off, got {mode!r}")
        if mode == "off":
            return cls()
        env = os.environ if env is None else env
        keys = parse_keys(env.get("OSUM_API_KEYS", ""))
        if file is not None:
            try:
                keys |= parse_keys(Path(file).read_text(), sep="\n")
            except OSError as e:
                raise InvalidConfigError(f"cannot read the API keys file: {e}") from e
        return cls(keys, redis, required=mode == "required")

    def describe(self) -> str:
        if not self.enabled:
            return "auth is OFF: anyone who can reach the ports may open sessions (local use only)"
        sources = [f"{len(self._keys)} static key(s)"] + (["Redis hash " + REDIS_KEYS_HASH] if self._redis is not None else [])
        return "auth is on: " + ", ".join(sources)

    async def authenticate(self, credential: str | None) -> Principal:
        """The caller's principal; UnauthenticatedError if the credential is missing or unknown."""
        if not self.enabled:
            return ANONYMOUS
        if not credential:
            raise UnauthenticatedError("missing API key (Authorization: Bearer <key>, or token=<key> for browsers)")
        d = _digest(credential)
        name = None
        for known, n in self._keys.items():  # compare every entry: no early exit on a match
            if hmac.compare_digest(known, d):
                name = n
        if name is None and self._redis is not None:
            try:
                found = await self._redis.hget(REDIS_KEYS_HASH, credential)
            except Exception as e:  # Redis down: refuse rather than let everyone in
                raise UnauthenticatedError("cannot check the API key now (key store unreachable)") from e
            name = found.decode() if isinstance(found, bytes) else found
        if name is None:
            raise UnauthenticatedError("invalid API key")
        return Principal(name)


def credential_from(headers: Iterable[tuple[str, str]], query: Mapping[str, str] | None = None) -> str | None:
    """The key from an ``authorization`` header/metadata entry, ``Sec-WebSocket-Protocol`` or ``token``."""
    protocols: list[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "authorization":
            scheme, _, rest = value.strip().partition(" ")
            if scheme.lower() in ("bearer", "token") and rest.strip():
                return rest.strip()
        elif lname == "sec-websocket-protocol":
            protocols += [p.strip() for p in value.split(",")]
    if len(protocols) >= 2 and protocols[0] == "token":
        return protocols[1]
    if query and query.get("token"):
        return query["token"]
    return None
