"""Where session state lives between connections and across replicas.

A :class:`SessionStore` keeps, per session, the resumable :class:`~streaming.session.Snapshot`
(plain JSON: config, sequence numbers, audio offset; never audio or device caches) and the
ordered log of its finalized results (Final and Analysis events), and fans every result
out to a global analytics stream. Two implementations:

* :class:`RedisStore` (``redis.asyncio``): the snapshot in a hash ``osum:session:<id>`` with
  a TTL, the results in a Stream ``osum:results:<id>`` trimmed to ``max_results``, and
  every result also in ``osum:results`` trimmed to ``global_maxlen``, for dashboards and
  storage to follow calls live with consumer groups;
* :class:`InMemoryStore`: the same behaviour in one process (tests, local use).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, Protocol

from .session_base import Snapshot

__all__ = ["SessionStore", "InMemoryStore", "RedisStore"]


class SessionStore(Protocol):
    async def save(self, snap: Snapshot) -> None:
        """Store (replace) a session's snapshot and refresh its TTL."""

    async def load(self, session_id: str) -> Snapshot | None:
        """The snapshot, or None if unknown or expired."""

    async def add_result(self, session_id: str, event: dict[str, Any]) -> None:
        """Append a finalized result (a Final or Analysis event as a dict) to the session's log."""

    async def commit(self, snap: Snapshot, events: list[dict[str, Any]]) -> None:
        """``add_result`` for each event, then ``save``: in one round trip, atomically where the store can."""

    async def results_after(self, session_id: str, seq: int) -> list[dict[str, Any]]:
        """The session's stored results with ``seq`` greater than the given one, in order."""

    async def delete(self, session_id: str) -> None: ...

    async def secret(self) -> bytes:
        """A random key shared by every replica on this store (signs resume tokens)."""

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class InMemoryStore:
    def __init__(self, ttl_s: float = 3600.0, max_results: int = 10000) -> None:
        self.ttl_s, self.max_results = ttl_s, max_results
        self._snaps: dict[str, tuple[float, str]] = {}
        self._results: dict[str, list[dict[str, Any]]] = {}
        self.global_log: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()
        self._secret = secrets.token_bytes(32)

    async def save(self, snap: Snapshot) -> None:
        async with self._lock:
            self._snaps[snap.session_id] = (time.monotonic() + self.ttl_s, json.dumps(snap.__dict__))

    async def load(self, session_id: str) -> Snapshot | None:
        item = self._snaps.get(session_id)
        if item is None or item[0] < time.monotonic():
            return None
        return Snapshot(**json.loads(item[1]))

    async def add_result(self, session_id: str, event: dict[str, Any]) -> None:
        async with self._lock:
            log = self._results.setdefault(session_id, [])
            log.append(json.loads(json.dumps(event)))
            del log[: max(0, len(log) - self.max_results)]
            self.global_log.append(event)

    async def commit(self, snap: Snapshot, events: list[dict[str, Any]]) -> None:
        for ev in events:
            await self.add_result(snap.session_id, ev)
        await self.save(snap)

    async def results_after(self, session_id: str, seq: int) -> list[dict[str, Any]]:
        return [e for e in self._results.get(session_id, []) if e["seq"] > seq]

    async def delete(self, session_id: str) -> None:
        self._snaps.pop(session_id, None)
        self._results.pop(session_id, None)

    async def secret(self) -> bytes:
        return self._secret

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class RedisStore:
    """Session state in Redis. Give it a URL (``redis://host:port/0`` or ``unix:///path.sock``)."""

    def __init__(self, url: str, ttl_s: int = 3600, max_results: int = 10000, global_maxlen: int = 100000,
                 prefix: str = "osum", max_connections: int = 32) -> None:  # fmt: skip
        import redis.asyncio as redis

        # a bounded pool that queues: hundreds of sessions share a few connections (every command is
        # one pipelined round trip) instead of failing with "Too many connections" under load
        pool = redis.BlockingConnectionPool.from_url(url, decode_responses=True, max_connections=max_connections, timeout=10)
        self.redis = redis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self.ttl_s, self.max_results, self.global_maxlen, self.prefix = ttl_s, max_results, global_maxlen, prefix

    def _k(self, kind: str, sid: str = "") -> str:
        return f"{self.prefix}:{kind}:{sid}" if sid else f"{self.prefix}:{kind}"

    async def save(self, snap: Snapshot) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            self._save(p, snap)
            await p.execute()

    async def load(self, session_id: str) -> Snapshot | None:
        raw = await self.redis.hgetall(self._k("session", session_id))
        if not raw:
            return None
        return Snapshot(**{k: json.loads(v) for k, v in raw.items()})

    async def add_result(self, session_id: str, event: dict[str, Any]) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            self._add(p, session_id, event)
            await p.execute()

    def _add(self, p: Any, session_id: str, event: dict[str, Any]) -> None:
        body = {"session_id": session_id, "seq": str(event["seq"]), "type": event["type"], "event": json.dumps(event)}
        p.xadd(self._k("results", session_id), body, maxlen=self.max_results, approximate=False)
        p.expire(self._k("results", session_id), self.ttl_s)
        p.xadd(self._k("results"), body, maxlen=self.global_maxlen, approximate=True)

    def _save(self, p: Any, snap: Snapshot) -> None:
        key = self._k("session", snap.session_id)
        p.hset(key, mapping={k: json.dumps(v) for k, v in snap.__dict__.items()})
        p.expire(key, self.ttl_s)
        p.expire(self._k("results", snap.session_id), self.ttl_s)

    async def commit(self, snap: Snapshot, events: list[dict[str, Any]]) -> None:
        async with self.redis.pipeline(transaction=True) as p:  # one round trip, MULTI/EXEC
            for ev in events:
                self._add(p, snap.session_id, ev)
            self._save(p, snap)
            await p.execute()

    async def results_after(self, session_id: str, seq: int) -> list[dict[str, Any]]:
        entries = await self.redis.xrange(self._k("results", session_id))
        events = [json.loads(fields["event"]) for _id, fields in entries]
        return [e for e in events if e["seq"] > seq]

    async def delete(self, session_id: str) -> None:
        await self.redis.delete(self._k("session", session_id), self._k("results", session_id))

    async def secret(self) -> bytes:
        key = self._k("resume_secret")
        await self.redis.set(key, secrets.token_hex(32), nx=True)  # the first replica's wins
        return bytes.fromhex(await self.redis.get(key))

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:  # connection refused, timeout: not ready
            return False

    async def close(self) -> None:
        await self.redis.aclose()
