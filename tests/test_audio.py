from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from osum.audio import (
    MAX_SAMPLES,
    IncrementalLogMel,
    load_audio,
    log_mel,
    normalize_log_mel,
    prepare_audio,
    raw_log_mel,
)
from osum.errors import AudioFileError, AudioTooLongError, InvalidAudioError


def test_log_mel_shape_and_range(male_clip: np.ndarray) -> None:
    mel = log_mel(male_clip)
    assert mel.shape == (80, len(male_clip) // 160)  # no padding to 30 s
    # after OSUM's clamp and scaling the range is exactly 8 log10 units / 4 = 2
    assert float(mel.max() - mel.min()) == pytest.approx(2.0, abs=1e-5)


def test_log_mel_matches_whisper_feature_extractor(male_clip: np.ndarray) -> None:
    """An independent implementation (numpy STFT, padded to 30 s) agrees away from the utterance end."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    ref = fe(male_clip, sampling_rate=16000, return_tensors="np").input_features[0]  # (80, 3000)
    ours = log_mel(male_clip).numpy()
    T = ours.shape[1]
    # zero padding to 30 s leaves the max unchanged (silence is at the floor), so values match
    np.testing.assert_allclose(ours[:, : T - 3], ref[:, : T - 3], atol=2e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_log_mel_equals_offline(male_clip: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    inc = IncrementalLogMel()
    frames, pos = [], 0
    while pos < len(male_clip):
        n = int(rng.integers(1, 3000))
        frames.append(inc.push(male_clip[pos : pos + n]))
        pos += n
    frames.append(inc.flush())
    streamed = torch.cat(frames, dim=1)
    offline = raw_log_mel(male_clip)
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, atol=1e-4, rtol=1e-5)
    # with the utterance maximum the normalised features are OSUM's
    torch.testing.assert_close(normalize_log_mel(streamed, streamed.max()), log_mel(male_clip), atol=1e-4, rtol=1e-5)


def test_incremental_log_mel_emits_early(male_clip: np.ndarray) -> None:
    inc = IncrementalLogMel()
    assert inc.push(male_clip[:200]).shape[1] == 0  # frame 0 needs 200 samples of right context
    assert inc.push(male_clip[200:201]).shape[1] == 1
    out = inc.push(male_clip[201:16000])
    assert inc.frames_emitted == (16000 - 200) // 160 + 1
    assert out.shape[1] == inc.frames_emitted - 1


def test_prepare_audio_conversions() -> None:
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = (tone * 32767).astype(np.int16)
    np.testing.assert_allclose(prepare_audio(pcm), tone, atol=1e-4)
    stereo = np.stack([tone, tone], axis=1)
    np.testing.assert_allclose(prepare_audio(stereo), tone, atol=1e-6)


def test_8khz_is_resampled(male_clip: np.ndarray) -> None:
    """8 kHz telephone audio becomes 16 kHz; below 4 kHz the features agree with the original."""
    from osum.audio import resample

    narrow = resample(male_clip, 16000, 8000)
    back = prepare_audio(narrow, 8000)
    assert abs(len(back) - len(male_clip)) <= 2
    a, b = log_mel(male_clip)[:50], log_mel(back)[:50, : log_mel(male_clip).shape[1]]  # mel bins under ~3.5 kHz
    corr = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
    assert corr > 0.95


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.full(16000, np.nan, np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf] * 8000, np.float32), 16000, "NaN or infinite"),
        (np.zeros(100, np.float32), 16000, "at least"),
        (np.zeros(16000, np.float32), 0, "sample rate"),
        (np.zeros((10, 10, 10), np.float32), 16000, "mono"),
        (np.zeros(16000, np.int32), 16000, "dtype"),
    ],
)
def test_prepare_audio_rejects(audio: np.ndarray, rate: int, message: str) -> None:
    with pytest.raises(InvalidAudioError, match=message):
        prepare_audio(audio, rate)


def test_over_30_seconds_is_refused() -> None:
    with pytest.raises(AudioTooLongError, match="at most 30 s"):
        prepare_audio(np.zeros(MAX_SAMPLES + 16000, np.float32))


def test_load_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "corrupt.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    with pytest.raises(AudioFileError, match="not a readable audio file"):
        load_audio(junk)


def test_two_hour_file_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "two_hours.flac"
    block = np.zeros(8000 * 60, dtype=np.int16)
    with sf.SoundFile(str(path), "w", samplerate=8000, channels=1, format="FLAC") as f:
        for _ in range(120):
            f.write(block)
    assert path.stat().st_size < 5_000_000  # silence compresses: the file is small, the audio long
    with pytest.raises(AudioTooLongError, match="7200.0 s"):
        load_audio(path)


def test_load_audio_stereo_44k(tmp_path: Path, male_clip: np.ndarray) -> None:
    from osum.audio import resample

    wide = resample(male_clip, 16000, 44100)
    path = tmp_path / "stereo.ogg"
    sf.write(str(path), np.stack([wide, wide], axis=1), 44100, format="OGG")
    audio = load_audio(path)
    assert abs(len(audio) - len(male_clip)) < 50
    corr = np.corrcoef(log_mel(audio)[:, :300].flatten().numpy(), log_mel(male_clip)[:, :300].flatten().numpy())[0, 1]
    assert corr > 0.9
