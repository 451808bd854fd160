"""Audio intake for one stream: bytes or arrays in, validated 16 kHz float32 out.

:class:`AudioIntake` accepts chunks of any size in the format declared when the
stream was opened (PCM16 little-endian or float32, any rate from 8 to 48 kHz, mono
or interleaved channels) and returns 16 kHz mono float32. Defined behaviour for bad
input, never a crash:

* an odd byte count (half a sample) keeps the spare byte for the next chunk;
* NaN or inf samples are an :class:`InvalidAudioError` (the chunk is dropped, the
  stream stays usable); clipping is counted, not refused;
* a chunk larger than ``max_chunk_bytes`` is an :class:`InvalidAudioError`;
* other rates are resampled with a streaming soxr resampler, so chunk boundaries
  leave no clicks and the output equals resampling the whole stream at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from osum.errors import InvalidAudioError, InvalidConfigError

__all__ = ["AudioFormat", "AudioIntake", "SAMPLE_RATE"]

SAMPLE_RATE = 16000
_ENCODINGS = {"pcm16": (np.dtype("<i2"), 2), "float32": (np.dtype("<f4"), 4)}


@dataclass(frozen=True)
class AudioFormat:
    """What the client declared it sends."""

    encoding: str = "pcm16"  # pcm16 | float32
    sample_rate: int = SAMPLE_RATE
    channels: int = 1
    max_chunk_bytes: int = 1 << 20  # 1 MiB: 32 s of 16 kHz PCM16

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise InvalidConfigError(f"encoding must be one of {', '.join(_ENCODINGS)}, got {self.encoding!r}")
        if not 8000 <= self.sample_rate <= 48000:
            raise InvalidConfigError(f"sample_rate must be between 8000 and 48000 Hz, got {self.sample_rate}")
        if not 1 <= self.channels <= 8:
            raise InvalidConfigError(f"channels must be 1 to 8, got {self.channels}")
        if self.max_chunk_bytes < 1024:
            raise InvalidConfigError("max_chunk_bytes must be at least 1024")

    @property
    def frame_bytes(self) -> int:
        return _ENCODINGS[self.encoding][1] * self.channels


class AudioIntake:
    """Stateful decoder + resampler for one stream."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._spare = b""
        self._resampler = None
        if fmt.sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(fmt.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self.samples_in = 0  # input frames accepted (at the declared rate)
        self.samples_out = 0  # 16 kHz samples produced
        self.clipped = 0  # samples at or beyond full scale

    def push(self, data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
        """Decode one chunk. Returns 16 kHz mono float32 (possibly empty).

        Raises:
            InvalidAudioError: oversized chunk, non-finite samples, or an array of the wrong kind.
        """
        if isinstance(data, np.ndarray):
            x, pcm = self._from_array(data)
        else:
            x, pcm = self._from_bytes(bytes(data))
        if x.size == 0:
            return x
        if pcm is not None:
            # integer PCM is finite and in range by construction: count clipping on the integers
            # (the common case, and the per-chunk cost that bounds sessions per core)
            self.clipped += int(np.count_nonzero((pcm >= 32735) | (pcm <= -32735)))
        else:
            if not np.isfinite(x).all():
                raise InvalidAudioError("audio chunk contains NaN or infinite samples; chunk dropped")
            self.clipped += int(np.count_nonzero(np.abs(x) >= 0.999))
            x = np.clip(x, -1.0, 1.0)
        self.samples_in += x.size
        return self._resample(x, last=False)

    def flush(self) -> np.ndarray:
        """End of stream: the resampler's tail. A dangling half sample is dropped."""
        self._spare = b""
        return self._resample(np.zeros(0, np.float32), last=True)

    def _from_bytes(self, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 mono, the int16 samples for PCM16)."""
        if len(data) > self.fmt.max_chunk_bytes:
            raise InvalidAudioError(f"audio chunk of {len(data)} bytes exceeds the {self.fmt.max_chunk_bytes}-byte limit")
        data = self._spare + data
        usable = len(data) // self.fmt.frame_bytes * self.fmt.frame_bytes
        self._spare = data[usable:]
        dtype, _ = _ENCODINGS[self.fmt.encoding]
        raw = np.frombuffer(data[:usable], dtype=dtype)
        if self.fmt.encoding == "pcm16":
            return self._mono(raw.astype(np.float32) * (1 / 32768)), raw
        return self._mono(raw.astype(np.float32)), None

    def _from_array(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 mono, the int16 samples when the input was integer PCM)."""
        if a.nbytes > self.fmt.max_chunk_bytes * 2:
            raise InvalidAudioError(f"audio chunk of {a.nbytes} bytes exceeds the limit")
        if a.dtype == np.int16:
            return self._mono(a.reshape(-1).astype(np.float32) * (1 / 32768)), a
        if np.issubdtype(a.dtype, np.floating):
            return self._mono(a.reshape(-1).astype(np.float32)), None
        raise InvalidAudioError(f"audio arrays must be int16 or float, got {a.dtype}")

    def _mono(self, x: np.ndarray) -> np.ndarray:
        c = self.fmt.channels
        return x if c == 1 else x.reshape(-1, c).mean(axis=1).astype(np.float32)

    def _resample(self, x: np.ndarray, last: bool) -> np.ndarray:
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=last).astype(np.float32)
        self.samples_out += x.size
        return x
