"""Voice activity and endpointing for one stream, on silero-vad's bundled model.

:class:`Endpointer` is a small state machine in the shape of silero's ``VADIterator``:
``push(samples)`` consumes 16 kHz audio in 512-sample frames (32 ms) and returns
:class:`VadEvent` values (speech start, speech end) with sample offsets. Its rules:

* speech starts when a frame's probability reaches ``threshold``; the utterance then
  begins ``speech_pad_ms`` earlier;
* speech ends after ``min_silence_ms`` of frames below ``threshold - 0.15`` (hysteresis,
  as silero does); the end is the first silent frame plus ``speech_pad_ms``;
* an utterance shorter than ``min_speech_ms`` is dropped (a cough, a click);
* an utterance reaching ``max_utterance_s`` is split at its quietest recent frame
  (lowest speech probability in the last ``split_search_ms``), and a new one begins there;
* :meth:`flush` ends an open utterance at the end of the stream, and :meth:`force_end`
  at the client's request (Finalize).

The model's recurrent state and the 64-sample context live in this object (one per
stream); the weights are shared. Frames are exact: offsets are multiples of 512 samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from osum.errors import InvalidConfigError

__all__ = ["VadOptions", "VadEvent", "Endpointer", "FRAME", "load_vad_model", "contains_speech"]

FRAME = 512  # samples per VAD frame at 16 kHz (silero's fixed window)
_CONTEXT = 64  # samples of the previous frame that silero prepends
_RATE = 16000


@dataclass(frozen=True)
class VadOptions:
    threshold: float = 0.5
    min_silence_ms: int = 600  # trailing silence that ends an utterance
    min_speech_ms: int = 250  # shorter utterances are dropped
    speech_pad_ms: int = 96  # audio kept before the start and after the end
    max_utterance_s: float = 25.0  # within Whisper's 30 s window, padding included
    split_search_ms: int = 3000  # where to look for the quietest frame when splitting

    def __post_init__(self) -> None:
        if not 0.15 < self.threshold < 1:
            raise InvalidConfigError(f"vad threshold must be in (0.15, 1), got {self.threshold}")
        if self.min_silence_ms < 32 or self.min_speech_ms < 0 or self.speech_pad_ms < 0:
            raise InvalidConfigError("min_silence_ms >= 32, min_speech_ms >= 0 and speech_pad_ms >= 0 are required")
        if not 1.0 <= self.max_utterance_s <= 29.0:
            raise InvalidConfigError(f"max_utterance_s must be in [1, 29] (Whisper's window is 30 s), got {self.max_utterance_s}")


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" | "end"
    sample: int  # offset in the stream, 16 kHz samples
    reason: str = ""  # for "end": silence | max_length | finalize | end_of_stream


@functools.lru_cache(maxsize=1)
def load_vad_model() -> torch.jit.ScriptModule:
    """silero-vad's bundled JIT model (no download), shared by every stream."""
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # silero ships TorchScript; torch now flags jit.load as deprecated
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        model = load_silero_vad(onnx=False)
    model.eval()
    return model


class Endpointer:
    """Per-stream VAD and endpointing. Feed 16 kHz float audio; get start/end events."""

    def __init__(self, options: VadOptions | None = None) -> None:
        self.opt = options or VadOptions()
        self._model = load_vad_model()
        ms = _RATE // 1000
        self._min_silence = self.opt.min_silence_ms * ms
        self._min_speech = self.opt.min_speech_ms * ms
        self._pad = self.opt.speech_pad_ms * ms
        self._max_len = int(self.opt.max_utterance_s * _RATE)
        self._search = self.opt.split_search_ms * ms
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next sample is sample 0 of a new stream."""
        self._state = torch.zeros(2, 1, 128)  # silero's recurrent state
        self._context = torch.zeros(1, _CONTEXT)
        self._pending = np.zeros(0, dtype=np.float32)
        self.samples = 0  # samples consumed into whole frames
        self.start: int | None = None  # open utterance's start sample
        self._silence_since: int | None = None
        self._probs: list[tuple[int, float]] = []  # (frame end sample, prob) within the open utterance
        self.last_prob = 0.0

    @property
    def in_speech(self) -> bool:
        return self.start is not None

    def _prob(self, frame: np.ndarray) -> float:
        x = torch.from_numpy(frame)[None]
        x = torch.cat([self._context, x], dim=1)
        with torch.no_grad():
            out, self._state = self._model._model(x, self._state)  # the bare 16 kHz network, state in and out
        self._context = x[:, -_CONTEXT:]
        return float(out.reshape(-1)[0])

    def push(self, audio: np.ndarray) -> list[VadEvent]:
        """Consume 16 kHz float samples (any count); return the events they complete."""
        buf = np.concatenate([self._pending, np.asarray(audio, dtype=np.float32).reshape(-1)])
        n = len(buf) // FRAME * FRAME
        self._pending = buf[n:]
        events: list[VadEvent] = []
        for i in range(0, n, FRAME):
            events += self._frame(buf[i : i + FRAME])
        return events

    def _frame(self, frame: np.ndarray) -> list[VadEvent]:
        p = self._prob(frame)
        self.last_prob = p
        self.samples += FRAME
        end_of_frame = self.samples
        events: list[VadEvent] = []
        if self.start is None:
            if p >= self.opt.threshold:
                self.start = max(0, end_of_frame - FRAME - self._pad)
                self._silence_since = None
                self._probs = [(end_of_frame, p)]
                events.append(VadEvent("start", self.start))
            return events
        self._probs.append((end_of_frame, p))
        if p >= self.opt.threshold:
            self._silence_since = None
        elif p < self.opt.threshold - 0.15 and self._silence_since is None:
            self._silence_since = end_of_frame - FRAME
        if self._silence_since is not None and end_of_frame - self._silence_since >= self._min_silence:
            events += self._end(min(self._silence_since + self._pad, end_of_frame), "silence")
        elif end_of_frame - self.start >= self._max_len:
            events += self._split()
        return events

    def _end(self, sample: int, reason: str) -> list[VadEvent]:
        start, self.start, self._silence_since, self._probs = self.start, None, None, []
        assert start is not None
        if sample - start < self._min_speech + self._pad and reason == "silence":
            return [VadEvent("end", sample, "too_short")]
        return [VadEvent("end", sample, reason)]

    def _split(self) -> list[VadEvent]:
        """Max length: end at the quietest recent frame and start again right there."""
        lo = self.samples - self._search
        window = [(s, p) for s, p in self._probs if s > lo] or self._probs[-1:]
        cut = min(window, key=lambda sp: sp[1])[0]
        tail = [(s, p) for s, p in self._probs if s > cut]
        events = self._end(cut, "max_length")
        self.start, self._probs = cut, tail
        return events + [VadEvent("start", cut)]

    @property
    def trailing_silence_ms(self) -> float:
        """How long the open utterance has been below the silence threshold (0: speaking, or no utterance)."""
        if self.start is None or self._silence_since is None:
            return 0.0
        return (self.samples - self._silence_since) / (_RATE // 1000)

    def tentative_end(self, after_ms: int) -> int | None:
        """Where the open utterance will end if the silence that began at least ``after_ms``
        ago lasts to ``min_silence_ms`` (the end a ``silence`` event would then carry), or None.

        Lets the caller start an utterance's final pass early ("eager" finals): the audio up
        to that end is already here, and it is exactly what the end event will delimit.
        """
        if self.start is None or self._silence_since is None:
            return None
        end = self._silence_since + self._pad
        if self.samples - self._silence_since < after_ms * (_RATE // 1000) or end > self.samples:
            return None
        if end - self.start < self._min_speech + self._pad:
            return None  # would be dropped as too short
        return end

    def force_end(self, reason: str = "finalize") -> list[VadEvent]:
        """End the open utterance now (client Finalize). Pending sub-frame samples count too."""
        if self.start is None:
            return []
        return self._end(self.samples + len(self._pending), reason)

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open utterance at the last sample."""
        return self.force_end("end_of_stream")


def contains_speech(audio: np.ndarray, options: VadOptions | None = None) -> bool:
    """Whether a live stream of ``audio`` (16 kHz float) would have any utterance: an end event
    that is not dropped as too short. A whole-file reader uses it so that a silent file gives no
    transcript, as a stream does, rather than whatever the LLM writes for silence."""
    ep = Endpointer(options)
    events = ep.push(audio) + ep.flush()
    return any(e.kind == "end" and e.reason != "too_short" for e in events)
