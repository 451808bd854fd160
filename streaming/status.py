"""The one place where error codes meet the wire: gRPC status codes and WebSocket close codes.

Every error the engine or the model raises on purpose is an :class:`osum.errors.OsumError`
with a ``code``; servers map that code here and nowhere else. Anything else is an
internal error: logged with its traceback, reported to the client without details.
"""

from __future__ import annotations

import grpc

from osum.errors import OsumError

__all__ = ["grpc_status", "ws_close_code", "RETRY_AFTER_S", "RETRY_CODES", "with_hint", "ProtocolError", "IdleTimeoutError"]

class ProtocolError(OsumError):
    """A client broke the wire protocol (either server): malformed or out-of-order messages."""

    code = "protocol_error"


class IdleTimeoutError(OsumError):
    """A client sent nothing for the server's idle timeout (either server)."""

    code = "idle_timeout"


RETRY_AFTER_S = 5  # hint sent with over-capacity and limit refusals
RETRY_CODES = frozenset({"over_capacity", "limit_exceeded", "state_unavailable"})

_GRPC = {
    "invalid_audio": grpc.StatusCode.INVALID_ARGUMENT,
    "audio_too_long": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_audio_file": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_config": grpc.StatusCode.INVALID_ARGUMENT,
    "protocol_error": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown_task": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_task": grpc.StatusCode.FAILED_PRECONDITION,
    "session_not_found": grpc.StatusCode.NOT_FOUND,
    "over_capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "limit_exceeded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "message_too_big": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "idle_timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "shutting_down": grpc.StatusCode.UNAVAILABLE,
    "state_unavailable": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "model_error": grpc.StatusCode.INTERNAL,
}

# RFC 6455 and the registered/private ranges: 1008 policy, 1009 too big, 1011 internal,
# 1012 restart, 1013 try again later; 4000-4999 are ours (HTTP-like: 4001 unauthenticated,
# 4004 not found, 4008 idle timeout, 4400 bad request).
_WS = {
    "protocol_error": 1008,
    "message_too_big": 1009,
    "over_capacity": 1013,
    "limit_exceeded": 1013,
    "idle_timeout": 4008,
    "shutting_down": 1012,
    "state_unavailable": 1013,
    "unauthenticated": 4001,
    "session_not_found": 4004,
    "invalid_config": 4400,
    "invalid_audio": 4400,
    "unknown_task": 4400,
    "unsupported_task": 4400,
    "model_error": 1011,
}


def grpc_status(code: str) -> grpc.StatusCode:
    return _GRPC.get(code, grpc.StatusCode.INTERNAL)


def ws_close_code(code: str) -> int:
    return _WS.get(code, 1011)


def with_hint(code: str, message: str) -> str:
    """The client-facing message, with a retry hint where waiting helps."""
    return f"{message} (retry after {RETRY_AFTER_S} s)" if code in RETRY_CODES else message
