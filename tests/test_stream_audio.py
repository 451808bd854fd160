from __future__ import annotations

import numpy as np
import pytest

from osum.errors import InvalidAudioError, InvalidConfigError
from streaming.audio import AudioFormat, AudioIntake


def _pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def test_pcm16_in_odd_pieces_equals_whole(male_clip: np.ndarray) -> None:
    data = _pcm(male_clip)
    intake = AudioIntake(AudioFormat())
    rng = np.random.default_rng(0)
    out, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(1, 5000))  # odd sizes split samples in half
        out.append(intake.push(data[pos : pos + n]))
        pos += n
    out.append(intake.flush())
    got = np.concatenate(out)
    np.testing.assert_array_equal(got, np.frombuffer(data, "<i2").astype(np.float32) / 32768.0)


def test_8khz_stream_resampled_like_the_whole_file(male_clip: np.ndarray) -> None:
    import soxr

    narrow = soxr.resample(male_clip, 16000, 8000).astype(np.float32)
    intake = AudioIntake(AudioFormat(encoding="float32", sample_rate=8000))
    pieces = [intake.push(narrow[i : i + 777].tobytes()) for i in range(0, len(narrow), 777)] + [intake.flush()]
    streamed = np.concatenate(pieces)
    whole = soxr.resample(narrow, 8000, 16000, quality="HQ")
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    np.testing.assert_allclose(streamed[:n], whole[:n], atol=2e-3)


def test_stereo_is_mixed_down() -> None:
    left, right = np.full(100, 0.5, np.float32), np.full(100, -0.25, np.float32)
    inter = np.stack([left, right], axis=1).reshape(-1)
    out = AudioIntake(AudioFormat(encoding="float32", channels=2)).push(inter.tobytes())
    np.testing.assert_allclose(out, np.full(100, 0.125, np.float32))


def test_bad_chunks_are_refused_and_the_stream_goes_on() -> None:
    intake = AudioIntake(AudioFormat(encoding="float32"))
    with pytest.raises(InvalidAudioError, match="NaN"):
        intake.push(np.array([0.1, np.nan], np.float32).tobytes())
    with pytest.raises(InvalidAudioError, match="exceeds"):
        intake.push(b"\x00" * (2 << 20))
    with pytest.raises(InvalidAudioError, match="int16 or float"):
        intake.push(np.zeros(4, np.int64))
    assert intake.push(np.full(4, 2.0, np.float32).tobytes()).max() == 1.0  # clipped, counted, accepted
    assert intake.clipped == 4 and intake.samples_in == 4


@pytest.mark.parametrize("kwargs", [dict(encoding="mp3"), dict(sample_rate=4000), dict(channels=0)])
def test_format_validated(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidConfigError):
        AudioFormat(**kwargs)
