"""Audio sources: a file, a numpy array, a microphone or any iterator of PCM16 chunks.

Every source yields little-endian PCM16 mono chunks of ``chunk_ms`` at ``sample_rate``.
``paced`` turns a source into a real-time one (what a live call sounds like); unpaced, the
client sends as fast as the server takes it (the server slows it by backpressure).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path

import numpy as np

__all__ = ["from_file", "from_array", "from_mic", "aiter_chunks", "paced", "to_pcm16"]


def to_pcm16(x: np.ndarray) -> bytes:
    """float audio in [-1, 1] (or int16) -> PCM16 little-endian bytes."""
    if x.dtype == np.int16:
        return x.astype("<i2").tobytes()
    return (np.clip(np.asarray(x, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def from_array(x: np.ndarray, sample_rate: int = 16000, chunk_ms: int = 100) -> Iterable[bytes]:
    """A mono array (float in [-1, 1] or int16) -> PCM16 chunks."""
    if x.ndim != 1:
        raise ValueError("a mono array is expected (mix channels down first)")
    data = to_pcm16(x)
    step = 2 * sample_rate * chunk_ms // 1000
    return [data[i : i + step] for i in range(0, len(data), step)]


def from_file(path: str | Path, sample_rate: int = 16000, chunk_ms: int = 100) -> Iterable[bytes]:
    """A sound file (wav, flac, ogg...) -> mono PCM16 chunks at ``sample_rate`` (resampled with soxr)."""
    import soundfile as sf
    import soxr

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != sample_rate:
        x = soxr.resample(x, sr, sample_rate)
    return from_array(x, sample_rate, chunk_ms)


async def aiter_chunks(source: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Any iterable (sync or async) of chunks as an async iterator."""
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            yield chunk
    else:
        for chunk in source:
            yield chunk
            await asyncio.sleep(0)


async def paced(source: Iterable[bytes] | AsyncIterable[bytes], sample_rate: int = 16000) -> AsyncIterator[bytes]:
    """Yield each chunk when its audio would have been spoken (no drift: scheduled from the start)."""
    t0, sent = time.monotonic(), 0.0
    async for chunk in aiter_chunks(source):
        delay = t0 + sent - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield chunk
        sent += len(chunk) / (2 * sample_rate)


async def from_mic(sample_rate: int = 16000, chunk_ms: int = 100, device: int | str | None = None) -> AsyncIterator[bytes]:
    """Live microphone audio (needs the ``mic`` extra: sounddevice and PortAudio). Runs until cancelled."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        raise RuntimeError("microphone input needs sounddevice: pip install 'osum-client[mic]'") from e
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=50)  # 5 s at 100 ms: then the oldest audio is dropped

    def callback(indata, frames, t, status) -> None:  # type: ignore[no-untyped-def]  # PortAudio's thread
        def put(b: bytes) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(b)

        loop.call_soon_threadsafe(put, bytes(indata))

    with sd.RawInputStream(samplerate=sample_rate, blocksize=sample_rate * chunk_ms // 1000, channels=1,
                           dtype="int16", device=device, callback=callback):  # fmt: skip
        while True:
            yield await queue.get()
