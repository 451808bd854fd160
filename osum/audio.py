"""Audio input and OSUM's log-mel front end.

OSUM computes Whisper's 80-bin log-mel (n_fft 400, hop 160, Hann window, Slaney
filterbank) on the utterance as it is: no padding to 30 s, so the dynamic-range
clamp (``max(x, x.max() - 8)``) uses the maximum of *this* utterance.

Two entry points share one implementation:

* :func:`log_mel` for a whole utterance (offline, what OSUM's inference does);
* :class:`IncrementalLogMel` for a live stream: it emits the *raw* log10 mel
  frames as soon as their 400-sample window is complete. Frame ``t`` of a stream
  equals frame ``t`` of :func:`raw_log_mel` on the same samples. Only the
  normalisation differs: offline it needs the utterance's maximum, which a live
  stream does not know yet, so streaming callers normalise with the running
  maximum (:func:`normalize_log_mel`) and the final pass recomputes the
  features with the utterance's true maximum.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .errors import AudioFileError, AudioTooLongError, InvalidAudioError

__all__ = [
    "FRAMES_PER_SECOND",
    "HOP_LENGTH",
    "MAX_FRAMES",
    "MAX_SAMPLES",
    "MAX_SECONDS",
    "MIN_SAMPLES",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "IncrementalLogMel",
    "load_audio",
    "trim_silence",
    "log_mel",
    "normalize_log_mel",
    "prepare_audio",
    "raw_log_mel",
    "resample",
    "speech_bounds",
]


def _exact_div(x: int, y: int) -> int:
    assert x % y == 0, (x, y)
    return x // y


SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
FRAMES_PER_SECOND = _exact_div(SAMPLE_RATE, HOP_LENGTH)  # 100 mel frames/s
MAX_SECONDS = 30  # Whisper's encoder has 1500 positions = 3000 mel frames
MAX_SAMPLES = MAX_SECONDS * SAMPLE_RATE
MAX_FRAMES = MAX_SECONDS * FRAMES_PER_SECOND
MIN_SAMPLES = _exact_div(SAMPLE_RATE, 10)  # 0.1 s: below this there is nothing to encode
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the maximum
# A file longer than this is refused before it is read, so a 2-hour file never fills memory.
MAX_FILE_SECONDS = 3600.0


@functools.cache
def _mel_filters(device: str) -> torch.Tensor:
    """Slaney-style mel filterbank, identical to ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)``.

    Returns: shape = (N_MELS, N_FFT // 2 + 1)
    """
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(fb.T.astype(np.float32)).to(device)


@functools.cache
def _window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float32 signal with soxr (high quality, band-limited)."""
    if orig_sr == target_sr:
        return audio
    import soxr

    return soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32)


def speech_bounds(audio: np.ndarray, margin: int = 0) -> tuple[int, int]:
    """(start, end) samples of ``audio`` from its first to its last 20 ms frame over -40 dBFS,
    widened by ``margin`` samples either side within the clip; the whole clip when no frame is loud."""
    frames = audio[: audio.size // 320 * 320].reshape(-1, 320)
    loud = np.flatnonzero(np.sqrt((frames**2).mean(1)) > 0.01)
    if not loud.size:
        return 0, audio.size
    return max(0, int(loud[0]) * 320 - margin), min(audio.size, (int(loud[-1]) + 1) * 320 + margin)


def trim_silence(audio: np.ndarray, margin: int = 800) -> np.ndarray:
    """``audio`` less its leading and trailing silence (:func:`speech_bounds`), keeping
    ``margin`` samples (50 ms) either side; a clip with no loud frame comes back whole."""
    start, end = speech_bounds(audio, margin)
    return audio[start:end]


def prepare_audio(audio: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE,
                  max_seconds: float = MAX_SECONDS) -> np.ndarray:  # fmt: skip
    """Validate an in-memory signal and return it as 16 kHz mono float32 in [-1, 1].

    Accepts float arrays in [-1, 1] or int16 PCM, mono ``(n,)`` or ``(n, channels)``.
    ``max_seconds``: the encoder's 30 s by default; a recording to be cut into utterances
    (``streaming.longform``) may be up to ``MAX_FILE_SECONDS``.

    Raises:
        InvalidAudioError: empty, non-finite, too short, or a nonsensical sample rate.
        AudioTooLongError: longer than ``max_seconds``.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if not isinstance(sample_rate, (int, np.integer)) or not 1000 <= sample_rate <= 384000:
        raise InvalidAudioError(f"sample rate must be an integer between 1000 and 384000 Hz, got {sample_rate!r}")
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    elif not np.issubdtype(audio.dtype, np.floating):
        raise InvalidAudioError(f"audio must be float in [-1, 1] or int16 PCM, got dtype {audio.dtype}")
    if audio.ndim == 2:  # (n, channels): mix down as OSUM does (channel mean)
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise InvalidAudioError(f"audio must be mono (n,) or (n, channels), got shape {audio.shape}")
    if audio.size == 0:
        raise InvalidAudioError("audio is empty")
    if not np.isfinite(audio).all():
        raise InvalidAudioError("audio contains NaN or infinite samples")
    audio = resample(audio.astype(np.float32, copy=False), int(sample_rate))
    if audio.size < MIN_SAMPLES:
        raise InvalidAudioError(f"audio is {audio.size / SAMPLE_RATE:.3f} s; at least {MIN_SAMPLES / SAMPLE_RATE} s is needed")
    if audio.size > max_seconds * SAMPLE_RATE:
        raise AudioTooLongError(_too_long(audio.size / SAMPLE_RATE, max_seconds))
    return np.clip(audio, -1.0, 1.0)


def _too_long(seconds: float, limit: float) -> str:
    if limit > MAX_SECONDS:
        return f"audio is {seconds:.1f} s; at most {limit:.0f} s is read"
    return (f"audio is {seconds:.1f} s; OSUM's encoder takes at most {MAX_SECONDS} s per utterance "
            "(cut longer audio into utterances: `osum transcribe --segment`, or stream it through the engine)")  # fmt: skip


def load_audio(path: str | Path, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Read a wav/flac/ogg file (soundfile), mix to mono, resample to 16 kHz.

    ``max_seconds``: as :func:`prepare_audio` (at most ``MAX_FILE_SECONDS``).

    Raises:
        AudioFileError: the file is missing, unreadable or not audio.
        InvalidAudioError / AudioTooLongError: as :func:`prepare_audio`.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"{path}: no such file")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError for junk
        raise AudioFileError(f"{path}: not a readable audio file ({e})") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise InvalidAudioError(f"{path}: audio is empty")
    limit = min(max_seconds, MAX_FILE_SECONDS)
    if info.frames / info.samplerate > limit:
        raise AudioTooLongError(f"{path}: {_too_long(info.frames / info.samplerate, limit)}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioFileError(f"{path}: could not decode audio ({e})") from e
    return prepare_audio(data, int(sr), limit)


def raw_log_mel(audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """log10 mel power of a 16 kHz signal, before OSUM's normalisation.

    Args:
        audio: shape = (n_samples,), float in [-1, 1], more than 200 samples.
    Returns:
        shape = (N_MELS, n_samples // HOP_LENGTH)
    """
    x = torch.as_tensor(audio, dtype=torch.float32)
    dev = str(x.device)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=_window(dev), return_complex=True)
    power = stft[..., :-1].abs() ** 2  # OSUM drops the last frame: T = n // 160
    mel = _mel_filters(dev) @ power
    return torch.clamp(mel, min=LOG_FLOOR).log10()


def normalize_log_mel(raw: torch.Tensor, max_value: float | torch.Tensor) -> torch.Tensor:
    """OSUM's dynamic-range clamp and scaling: ``(max(x, max_value - 8) + 4) / 4``."""
    max_value = torch.as_tensor(max_value, dtype=raw.dtype, device=raw.device)
    return (torch.maximum(raw, max_value - DYNAMIC_RANGE) + 4.0) / 4.0


def log_mel(audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """OSUM's features for one utterance. Returns shape = (N_MELS, n_samples // 160)."""
    raw = raw_log_mel(audio)
    return normalize_log_mel(raw, raw.max())


class IncrementalLogMel:
    """Streaming log-mel: push samples, get the raw log10 mel frames that became complete.

    Frame ``t`` is centred on sample ``160 t`` and needs samples up to ``160 t + 200``;
    the first frames reflect the first 200 samples (as ``torch.stft(center=True)`` does)
    and :meth:`flush` reflects the last ones, so the frames of a whole stream equal
    :func:`raw_log_mel` of the concatenated samples.
    """

    _HALF = N_FFT // 2

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next sample is sample 0 of a new stream."""
        self._buf = np.zeros(0, dtype=np.float32)  # samples from index self._buf_start on
        self._buf_start = 0
        self._n_samples = 0
        self._next_frame = 0
        self._head: np.ndarray | None = None  # the first 201 samples, for the left reflection

    @property
    def frames_emitted(self) -> int:
        return self._next_frame

    def push(self, samples: np.ndarray) -> torch.Tensor:
        """Add 16 kHz float samples. Returns the new frames, shape = (N_MELS, k), k >= 0."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, samples])
        self._n_samples += samples.size
        if self._head is None and self._n_samples > self._HALF:
            self._head = self._samples(0, self._HALF + 1).copy()
        # frame t is complete when 160 t + 200 <= n
        last = (self._n_samples - self._HALF) // HOP_LENGTH if self._n_samples >= self._HALF else -1
        return self._emit(last + 1, final=False)

    def flush(self) -> torch.Tensor:
        """End of stream: emit the remaining frames up to ``n // 160`` (right edge reflected)."""
        return self._emit(self._n_samples // HOP_LENGTH, final=True)

    def _samples(self, start: int, stop: int) -> np.ndarray:
        return self._buf[start - self._buf_start : stop - self._buf_start]

    def _emit(self, end_frame: int, final: bool) -> torch.Tensor:
        t0 = self._next_frame
        if end_frame <= t0 or self._n_samples <= self._HALF:
            return torch.zeros(N_MELS, 0)
        lo, hi = t0 * HOP_LENGTH - self._HALF, (end_frame - 1) * HOP_LENGTH + self._HALF
        parts = []
        if lo < 0:  # left reflection: padded[i] = x[-i] for i < 0
            assert self._head is not None
            parts.append(self._head[1 : -lo + 1][::-1])
        parts.append(self._samples(max(lo, 0), min(hi, self._n_samples)))
        if hi > self._n_samples:  # right reflection, only at flush
            assert final
            tail = self._samples(self._n_samples - (hi - self._n_samples) - 1, self._n_samples - 1)
            parts.append(tail[::-1])
        seg = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))
        stft = torch.stft(seg, N_FFT, HOP_LENGTH, window=_window("cpu"), center=False, return_complex=True)
        mel = _mel_filters("cpu") @ (stft.abs() ** 2)
        self._next_frame = end_frame
        # keep only what the next frame needs (from 160 t - 200)
        keep_from = max(end_frame * HOP_LENGTH - self._HALF, 0)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start :]
            self._buf_start = keep_from
        return torch.clamp(mel, min=LOG_FLOOR).log10()
