"""What every session is made of, model or none: its options (:class:`SessionConfig`, from the
client's first message), its state, its resumable :class:`Snapshot` (what the store keeps), and
:class:`SessionBase`: the checked audio intake and numbered events that the model's
:class:`~streaming.session.Session` and the null engine's session share.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from osum.errors import InvalidConfigError, OsumError

from .audio import SAMPLE_RATE, AudioFormat, AudioIntake
from .events import Error, Event
from .vad import VadOptions
from .work import TAG_TASKS

__all__ = ["SessionBase", "SessionConfig", "Snapshot", "State"]

log = logging.getLogger("streaming.session")


@dataclass(frozen=True)
class SessionConfig:
    """A session's options, validated once, from the client's first message."""

    audio: AudioFormat = field(default_factory=AudioFormat)
    vad: VadOptions = field(default_factory=VadOptions)
    interim_results: bool = True
    partial_step_ms: int = 480  # new audio between partials; also the encoder's chunk (multiple of 80 ms)
    left_chunks: int = -1  # encoder left context for partials, in chunks (-1: the whole utterance)
    tasks: tuple[str, ...] = ("emotion", "style", "events")  # analysis after each Final
    chat: bool = False  # voice chat: the model's reply to each utterance (STTC) in its Analysis
    max_partial_tokens: int = 80
    # eager finals: after this much trailing silence, start the utterance's final pass on the
    # audio the endpoint will keep if the silence lasts; the Final is then ready (or nearly)
    # when the endpoint fires at vad.min_silence_ms. Wasted if speech resumes. 0: off; no
    # effect unless below min_silence_ms; raised to speech_pad_ms (the end needs that audio).
    eager_final_ms: int = 200
    word_times: bool = False  # each Final's words with their times (models with a word aligner)
    # what a partial encodes: "full" re-encodes the utterance so far with the full-context encoder
    # (what the models were trained on: far better partials, and drafts that the Final's pass
    # verifies instead of decoding; cost grows with the utterance), "chunked" only the new
    # chunk on the session's encoder and LLM caches (bounded cost; osum-mini's adapter was not
    # trained on chunked features: held-out WER 46.7 % against 7.8 %, docs/streaming.md)
    partial_context: str = "full"
    # full-context partials only: the step grows to this fraction of the utterance so far
    # (0: a fixed step). A partial's cost grows with the utterance (on 2 cores, int8, about
    # 60 ms per second of it), so with a fixed step the work of an utterance's partials grows
    # as its length squared and a long one holds the worker; spaced in proportion, the share
    # of the worker stays bounded (about 60 ms / 0.1 s = 0.6 of it for one stream on 2 cores
    # at any length) and equals the fixed step's at the length where they meet (4.8 s)
    partial_growth: float = 0.1

    def __post_init__(self) -> None:
        if self.partial_step_ms < 80 or self.partial_step_ms % 80:
            raise InvalidConfigError(f"partial_step_ms must be a positive multiple of 80, got {self.partial_step_ms}")
        unknown = [t for t in self.tasks if t not in TAG_TASKS]
        if unknown:
            raise InvalidConfigError(f"unknown analysis task(s) {unknown}; known: {', '.join(TAG_TASKS)}")
        if not 1 <= self.max_partial_tokens <= 400:
            raise InvalidConfigError("max_partial_tokens must be in [1, 400]")
        if self.partial_context not in ("full", "chunked"):
            raise InvalidConfigError(f"partial_context must be 'full' or 'chunked', got {self.partial_context!r}")
        if not 0 <= self.partial_growth <= 1:
            raise InvalidConfigError(f"partial_growth must be in [0, 1], got {self.partial_growth}")
        if self.eager_final_ms < 0:
            raise InvalidConfigError(f"eager_final_ms must be >= 0 (0: off), got {self.eager_final_ms}")

    @property
    def eager_after_ms(self) -> int | None:
        """Trailing silence after which a final pass starts early; None when eager finals are off."""
        ms = max(self.eager_final_ms, self.vad.speech_pad_ms)
        return ms if self.eager_final_ms and ms < self.vad.min_silence_ms else None

    def partial_due(self, utterance_samples: int) -> int:
        """New 16 kHz samples between partials of an utterance that has this many so far."""
        step = self.partial_step_ms * 16
        if self.partial_context == "full":
            step = max(step, int(self.partial_growth * utterance_samples))
        return step

    @property
    def chunk_frames(self) -> int:
        """Encoder frames (50 Hz) per partial step."""
        return self.partial_step_ms // 20

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionConfig:
        d = dict(d)
        audio = AudioFormat(**d.pop("audio", {}))
        vad = VadOptions(**d.pop("vad", {}))
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"])
        return cls(audio=audio, vad=vad, **d)


class State(enum.Enum):
    OPEN = "open"  # accepting audio
    ENDING = "ending"  # end of stream received: finishing the open utterances
    CLOSED = "closed"  # everything sent


@dataclass
class Snapshot:
    """What a session needs to be resumed elsewhere: plain data, no audio, no tensors."""

    session_id: str
    config: dict[str, Any]
    seq: int
    next_utterance: int
    audio_offset: int  # 16 kHz samples consumed
    finals: list[dict[str, Any]] = field(default_factory=list)  # finalized results (events as dicts)
    owner: str = "anonymous"  # the API key name that opened it; only it may resume the session


class SessionBase:
    """What :class:`Session` and the null engine's session share: the checked audio intake and
    numbered events (``id``, ``seq``, ``state``, ``intake``, ``_base``, ``_events`` are set by the
    subclass, which turns decoded audio into events in ``_consume``)."""

    id: str
    seq: int
    state: State
    intake: AudioIntake
    _base: int
    _now: int  # samples consumed by this session object
    _events: list[Event]

    @property
    def position(self) -> int:
        """Stream samples (16 kHz) heard so far, across resumes."""
        return self._base + self._now

    def pending_from(self) -> int:
        """The earliest stream sample that an event still to come can end at."""
        return self.position

    def queued_samples(self) -> int:
        """Audio of ended utterances still waiting for the model (the backpressure measure)."""
        return 0

    def feed(self, data: bytes | np.ndarray) -> None:
        """Audio from the client. A bad chunk becomes an Error event; the session goes on."""
        if self.state is not State.OPEN:
            self._error("session_ending", "audio after the end of stream was ignored")
            return
        try:
            x = self.intake.push(data)
        except OsumError as e:
            self._error(e.code, str(e))
            return
        self._consume(x)

    def _consume(self, x: np.ndarray) -> None:
        """Decoded 16 kHz audio (float32) -> state changes and events."""
        raise NotImplementedError

    def _t(self, sample: int) -> float:
        return round((self._base + sample) / SAMPLE_RATE, 3)

    def _emit(self, cls: type[Event], **fields: Any) -> Event:
        ev = cls(seq=self.seq, session_id=self.id, **fields)
        self.seq += 1
        self._events.append(ev)
        return ev

    def warn(self, code: str, message: str) -> None:
        """A non-fatal Error event from outside the model path (e.g. the store is down)."""
        self._error(code, message)

    def fatal(self, code: str, message: str) -> None:
        """A fatal Error event: the session ends here (its driver failed)."""
        self._error(code, message, fatal=True)

    def _error(self, code: str, message: str, fatal: bool = False) -> None:
        log.info("session %s: %s: %s", self.id, code, message, extra={"session_id": self.id})
        self._emit(Error, code=code, message=message, fatal=fatal)

    def drain(self) -> list[Event]:
        """Events produced since the last call, in order."""
        out, self._events = self._events, []
        return out
