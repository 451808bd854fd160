"""Whole recordings through the streaming engine (the unary ``Recognize`` call).

A recording is decoded (a wav/flac/ogg file, or raw audio in the declared encoding),
fed to a session without interim results as fast as the engine takes it, and its
Finals and Analyses are collected: long recordings are segmented by the same VAD as
live streams.
"""

from __future__ import annotations

import io

import numpy as np

from osum.errors import AudioFileError, AudioTooLongError, InvalidAudioError

from .audio import AudioFormat
from .engine import Engine
from .events import Analysis, Error, Final
from .proto import speech_pb2 as pb
from .session_base import SessionConfig

__all__ = ["recognize_file", "MAX_RECORDING_S"]

MAX_RECORDING_S = 600
_CHUNK = 1 << 19


def _decode(config: pb.RecognitionConfig, audio: bytes) -> tuple[AudioFormat, bytes]:
    if config.encoding != pb.RecognitionConfig.ENCODING_UNSPECIFIED:
        from .grpc_server import audio_format

        fmt = audio_format(config)
        seconds = len(audio) / fmt.frame_bytes / fmt.sample_rate
    else:
        import soundfile as sf

        try:
            data, rate = sf.read(io.BytesIO(audio), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile's errors for junk
            raise AudioFileError(f"not a readable audio file ({e})") from e
        fmt = AudioFormat(encoding="float32", sample_rate=int(rate), channels=1)
        audio = np.ascontiguousarray(data.mean(axis=1), dtype="<f4").tobytes()
        seconds = len(data) / rate
    if seconds > MAX_RECORDING_S:
        raise AudioTooLongError(f"recording is {seconds:.0f} s; Recognize takes at most {MAX_RECORDING_S} s (stream it instead)")
    return fmt, audio


async def recognize_file(engine: Engine, config: pb.RecognitionConfig, audio: bytes,
                         owner: str = "anonymous") -> tuple[list[Final], list[Analysis]]:  # fmt: skip
    """The Finals and Analyses of a whole recording, as a session of ``owner`` (an API key's
    name: the key's session limit counts it like a stream)."""
    fmt, raw = _decode(config, audio)
    cfg = SessionConfig(audio=fmt, interim_results=False, tasks=tuple(config.analysis_tasks), chat=config.enable_chat_reply,
                        word_times=config.enable_word_time_offsets)
    session = await engine.open_session(cfg, owner=owner)
    for i in range(0, len(raw), _CHUNK):
        await session.send(raw[i : i + _CHUNK])
    await session.end()
    finals, analyses = [], []
    async for ev in session.events():
        if isinstance(ev, Final):
            finals.append(ev)
        elif isinstance(ev, Analysis):
            analyses.append(ev)
        elif isinstance(ev, Error):  # a bad chunk in a recording spoils the request
            raise InvalidAudioError(ev.message)
    return finals, analyses
