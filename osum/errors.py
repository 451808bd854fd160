"""The one error hierarchy of the project.

Every error a caller can act on derives from :class:`OsumError`; servers map the
``code`` of an error once, at the edge, to a gRPC status or a WebSocket close code::

    OsumError                      code
    ├── InvalidAudioError          invalid_audio      (empty, NaN/inf, too short, wrong rate)
    │   └── AudioTooLongError      audio_too_long     (over the 30 s encoder window)
    ├── AudioFileError             invalid_audio_file (unreadable, corrupt, unsupported)
    ├── InvalidConfigError         invalid_config     (bad option values)
    ├── UnknownTaskError           unknown_task
    ├── UnsupportedTaskError       unsupported_task   (this model was not trained/measured on it)
    ├── ModelNotFoundError         model_not_found    (no such name or directory)
    └── CheckpointError            bad_checkpoint     (wrong, truncated or foreign weights)
"""

from __future__ import annotations

__all__ = [
    "AudioFileError",
    "AudioTooLongError",
    "CheckpointError",
    "InvalidAudioError",
    "InvalidConfigError",
    "ModelNotFoundError",
    "OsumError",
    "UnknownTaskError",
    "UnsupportedTaskError",
]


class OsumError(Exception):
    """Base class of every error raised on purpose by osum and streaming."""

    code = "internal"


class InvalidAudioError(OsumError, ValueError):
    code = "invalid_audio"


class AudioTooLongError(InvalidAudioError):
    code = "audio_too_long"


class AudioFileError(OsumError):
    code = "invalid_audio_file"


class InvalidConfigError(OsumError, ValueError):
    code = "invalid_config"


class UnknownTaskError(OsumError, KeyError):
    code = "unknown_task"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown task"


class UnsupportedTaskError(OsumError):
    code = "unsupported_task"


class ModelNotFoundError(OsumError):
    code = "model_not_found"


class CheckpointError(OsumError):
    code = "bad_checkpoint"
