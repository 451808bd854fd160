"""The engine's refusals: what a client is told when a session cannot be opened, resumed or fed.

Each is an :class:`~osum.errors.OsumError`; servers map its ``code`` once, at the edge
(:mod:`streaming.status`), to a gRPC status and a WebSocket close code. The other errors
the servers send live beside what raises them: ``ProtocolError`` and ``IdleTimeoutError``
(:mod:`streaming.status`), ``ModelError`` (:mod:`streaming.scheduler`) and
``UnauthenticatedError`` (:mod:`streaming.auth`).
"""

from __future__ import annotations

from osum.errors import OsumError

__all__ = ["OverCapacityError", "SessionLimitError", "SessionNotFoundError", "ShuttingDownError", "StateUnavailableError"]


class OverCapacityError(OsumError):
    """Too many sessions, the model's worker lags real time, or the engine has not started: retry later."""

    code = "over_capacity"


class ShuttingDownError(OsumError):
    """The engine drains (stopped after it started): no new sessions; retry on another replica now."""

    code = "shutting_down"


class SessionNotFoundError(OsumError):
    """A resume token that is invalid, another key's, or whose session is no longer stored."""

    code = "session_not_found"


class StateUnavailableError(OsumError):
    """The session store cannot be reached (only a resume needs it)."""

    code = "state_unavailable"


class SessionLimitError(OsumError):
    """A per-key or per-session limit (sessions of one key, audio length of one session)."""

    code = "limit_exceeded"
