"""Endpointing on real speech with silero-vad's bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from osum.errors import InvalidConfigError
from streaming.vad import FRAME, Endpointer, VadOptions

SIL = np.zeros(16000 * 2, np.float32)


def _run(e: Endpointer, x: np.ndarray, step: int = 1000) -> list:
    out = []
    for i in range(0, len(x), step):
        out += [(ev, e.samples) for ev in e.push(x[i : i + step])]
    return out


def test_two_utterances_match_silero_offline(male_clip: np.ndarray, female_clip: np.ndarray) -> None:
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    x = np.concatenate([SIL, male_clip, SIL, female_clip, SIL])
    got = [ev for ev, _ in _run(Endpointer(VadOptions(speech_pad_ms=0)), x)]
    ref = get_speech_timestamps(torch.from_numpy(x), load_silero_vad(), min_silence_duration_ms=600, speech_pad_ms=0)
    starts = [ev.sample for ev in got if ev.kind == "start"]
    ends = [ev.sample for ev in got if ev.kind == "end"]
    assert len(starts) == len(ends) == len(ref) == 2
    for s, e, r in zip(starts, ends, ref):
        assert abs(s - r["start"]) <= FRAME and abs(e - r["end"]) <= 2 * FRAME


@pytest.mark.parametrize("silence_ms", [300, 600, 1000])
def test_endpoint_fires_within_one_frame_of_the_configured_silence(male_clip: np.ndarray, silence_ms: int) -> None:
    x = np.concatenate([SIL[:8000], male_clip, SIL, SIL])
    e = Endpointer(VadOptions(min_silence_ms=silence_ms, speech_pad_ms=0))
    fired = [(ev, at) for ev, at in _run(e, x, step=FRAME) if ev.kind == "end"]
    assert len(fired) == 1
    ev, at = fired[0]
    assert ev.reason == "silence"
    # the decision comes silence_ms after the speech's end, to within one VAD frame
    assert abs((at - ev.sample) - silence_ms * 16) <= FRAME


def test_max_length_splits_at_a_quiet_point(male_clip: np.ndarray, female_clip: np.ndarray) -> None:
    speech = np.concatenate([male_clip, female_clip[:8000], male_clip, female_clip])  # no long pause
    e = Endpointer(VadOptions(max_utterance_s=5.0, min_silence_ms=2000))
    events = [ev for ev, _ in _run(e, np.concatenate([speech, SIL, SIL]))]
    ends = [ev for ev in events if ev.kind == "end"]
    assert any(ev.reason == "max_length" for ev in ends)
    starts = [ev for ev in events if ev.kind == "start"]
    for s, en in zip(starts, ends):  # every piece fits the window
        assert en.sample - s.sample <= 5.0 * 16000 + FRAME


def test_finalize_flush_and_short_noises(male_clip: np.ndarray) -> None:
    e = Endpointer()
    events = [ev for ev, _ in _run(e, np.concatenate([SIL[:8000], male_clip[:24000]]))]
    assert [ev.kind for ev in events] == ["start"] and e.in_speech
    forced = e.force_end()
    assert [(ev.kind, ev.reason) for ev in forced] == [("end", "finalize")] and not e.in_speech
    assert e.force_end() == [] and e.flush() == []
    # a click: loud for 64 ms, then silence -> dropped as too short
    click = np.concatenate([SIL[:8000], np.random.default_rng(0).uniform(-0.8, 0.8, 1024).astype(np.float32), SIL])
    ends = [ev for ev, _ in _run(Endpointer(), click) if ev.kind == "end"]
    assert all(ev.reason == "too_short" for ev in ends)


def test_silence_and_noise_never_start(male_clip: np.ndarray) -> None:
    e = Endpointer()
    assert _run(e, np.zeros(16000 * 20, np.float32)) == []
    assert e.samples == 16000 * 20 // FRAME * FRAME


def test_options_validated() -> None:
    for bad in (dict(threshold=1.5), dict(min_silence_ms=10), dict(max_utterance_s=40)):
        with pytest.raises(InvalidConfigError):
            VadOptions(**bad)  # type: ignore[arg-type]


def test_contains_speech_is_whether_a_stream_would_have_an_utterance(male_clip: np.ndarray) -> None:
    """Real speech anywhere in the clip counts; silence, faint noise and a 100 ms burst (dropped
    as too short, as a live stream drops it) do not."""
    from streaming.vad import contains_speech

    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000) * 1e-3).astype(np.float32)
    burst = np.concatenate([SIL[:8000], male_clip[8000:9600], SIL])  # 0.1 s cut out of a word, then silence
    assert contains_speech(male_clip) and contains_speech(np.concatenate([SIL, male_clip]))
    assert not contains_speech(SIL) and not contains_speech(noise) and not contains_speech(burst)
