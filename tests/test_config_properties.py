"""Property-based tests (hypothesis) of the gRPC and Realtime config validation: any config a
client can send becomes a valid SessionConfig or a documented invalid_config error, never
another exception (which a server would report as an internal error)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from osum.errors import OsumError
from streaming.grpc_server import session_config
from streaming.proto import speech_pb2 as pb
from streaming.realtime import config_from_session
from streaming.session_base import SessionConfig

_INT32 = st.integers(-(2**31), 2**31 - 1)
_FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True)
_TASKS = st.lists(st.sampled_from(["emotion", "style", "events", "gender", "age", "karaoke", "", "EMOTION"]) | st.text(max_size=8), max_size=4)


def _valid(cfg: SessionConfig) -> None:
    """What every accepted config guarantees (SessionConfig validated it once)."""
    assert 8000 <= cfg.audio.sample_rate <= 48000 and cfg.audio.channels >= 1
    assert cfg.partial_step_ms > 0 and cfg.partial_step_ms % 80 == 0
    v = cfg.vad
    assert 0 < v.threshold < 1 and v.min_silence_ms > 0 and v.min_speech_ms > 0
    assert math.isfinite(v.max_utterance_s) and 0 < v.max_utterance_s <= 29


@st.composite
def _grpc_configs(draw: Any) -> pb.StreamingRecognitionConfig:
    rc = pb.RecognitionConfig(encoding=draw(st.integers(-1, 4)), sample_rate_hertz=draw(_INT32 | st.sampled_from([0, 8000, 16000, 48000])),
                              audio_channel_count=draw(st.integers(-2, 9)), analysis_tasks=draw(_TASKS),
                              enable_chat_reply=draw(st.booleans()))  # fmt: skip
    if draw(st.booleans()):
        e = pb.EndpointingConfig(min_silence_ms=draw(_INT32 | st.sampled_from([0, 300, 600])),
                                 min_speech_ms=draw(_INT32 | st.sampled_from([0, 250])),
                                 max_utterance_s=draw(_FLOAT | st.sampled_from([0.0, 10.0, 29.0])),
                                 threshold=draw(_FLOAT | st.sampled_from([0.0, 0.5])))  # fmt: skip
        if draw(st.booleans()):
            e.eager_final_ms = draw(_INT32 | st.sampled_from([0, 200]))
        rc.endpointing_config.CopyFrom(e)
    return pb.StreamingRecognitionConfig(config=rc, interim_results=draw(st.booleans()),
                                         partial_step_ms=draw(_INT32 | st.sampled_from([0, 80, 480, 100])))  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_grpc_configs())
def test_grpc_config_validation_is_total(sc: pb.StreamingRecognitionConfig) -> None:
    try:
        cfg = session_config(sc)
    except OsumError as e:
        assert e.code in ("invalid_config", "unknown_task"), e
        return
    _valid(cfg)
    assert cfg.audio.sample_rate == (sc.config.sample_rate_hertz or 16000)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)  # fmt: skip
_FORMAT = st.sampled_from(["pcm16", "g711_ulaw"]) | st.fixed_dictionaries(
    {}, optional={"type": st.sampled_from(["audio/pcm", "audio/pcmu"]) | _JSON, "rate": st.sampled_from([8000, 16000, 24000, 4000]) | _JSON})
_TURN = st.none() | st.fixed_dictionaries(
    {}, optional={"type": st.sampled_from(["server_vad", "semantic_vad"]) | _JSON, "threshold": _FLOAT | _JSON,
                  "silence_duration_ms": st.integers(-100, 5000) | _JSON})  # fmt: skip
_SESSION = st.fixed_dictionaries({}, optional={
    "input_audio_format": _FORMAT | _JSON,
    "turn_detection": _TURN | _JSON,
    "audio": st.fixed_dictionaries({}, optional={"input": st.fixed_dictionaries({}, optional={"format": _FORMAT, "turn_detection": _TURN}) | _JSON}) | _JSON,
    "osum": st.fixed_dictionaries({}, optional={"tasks": _TASKS | _JSON, "chat": _JSON}) | _JSON,
})  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_SESSION | _JSON)
def test_realtime_session_validation_is_total(session: Any) -> None:
    try:
        cfg = config_from_session(session, SessionConfig())
    except OsumError as e:
        assert e.code in ("invalid_config", "unknown_task"), e
        return
    _valid(cfg)
