"""A null engine: the service without the model, to measure the service's own overhead.

:class:`NullEngine` is an :class:`~streaming.engine.Engine` whose sessions are
:class:`NullSession` s: the same intake (decoding, resampling, limits), the same driver,
store, metrics and servers, but an energy detector instead of silero-vad and no model
work. Per 20 ms frame it decides speech or silence (RMS over -40 dBFS); 600 ms of silence
ends an utterance (``SessionConfig.vad.min_silence_ms``), 250 ms of speech starts one. It
emits the events a real session would, at constant cost: ``SpeechStarted``, a ``Partial``
every ``partial_step_ms`` of speech, ``SpeechEnded``, a ``Final`` and an ``Analysis`` whose
texts and labels say ``null`` (nothing is recognised).

``osum-serve --engine null`` runs it; ``load_tests/`` uses it to find how many sessions the
servers carry and the latency they add on their own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from osum.errors import OsumError

from .audio import SAMPLE_RATE, AudioIntake
from .engine import Engine, EngineOptions
from .events import Analysis, Event, Final, Label, Partial, SpeechEnded, SpeechStarted
from .session_base import SessionBase, SessionConfig, Snapshot, State
from .store import SessionStore

__all__ = ["NullEngine", "NullSession"]

FRAME = 320  # 20 ms at 16 kHz
_THRESHOLD = 10 ** (-40 / 20)  # -40 dBFS


class NullSession(SessionBase):
    """The sans-I/O surface of :class:`~streaming.session.Session`, with no model behind it."""

    def __init__(self, session_id: str, config: SessionConfig, snapshot: Snapshot | None = None,
                 owner: str = "anonymous") -> None:  # fmt: skip
        self.id, self.config = session_id, config
        self.owner = snapshot.owner if snapshot else owner
        self.intake = AudioIntake(config.audio)
        self.state = State.OPEN
        self.seq = snapshot.seq if snapshot else 0
        self._next_utt = snapshot.next_utterance if snapshot else 0
        self._base = snapshot.audio_offset if snapshot else 0
        self.finals: list[dict[str, Any]] = list(snapshot.finals) if snapshot else []
        self._events: list[Event] = []
        self._now = 0  # samples consumed
        self._spare = np.zeros(0, np.float32)  # less than a frame
        self._run = 0  # consecutive speech (in an utterance: silence) frames
        self._utt: tuple[int, int] | None = None  # (id, start sample) of the open utterance
        self._last_speech = 0
        self._next_partial = 0

    # ---- input ------------------------------------------------------------------------

    def _consume(self, x: np.ndarray) -> None:
        x = np.concatenate([self._spare, x]) if self._spare.size else x
        n = x.size // FRAME
        self._spare = x[n * FRAME :]
        if n:
            frames = x[: n * FRAME].reshape(n, FRAME)
            energy = np.einsum("ij,ij->i", frames, frames)  # sum of squares per frame, in one pass
            for loud in (energy > _THRESHOLD * _THRESHOLD * FRAME).tolist():
                self._frame(loud)

    def _frame(self, loud: bool) -> None:
        self._now += FRAME
        vad = self.config.vad
        if self._utt is None:
            self._run = self._run + 1 if loud else 0
            if self._run * FRAME >= vad.min_speech_ms * SAMPLE_RATE // 1000:
                start = self._now - self._run * FRAME
                self._utt, self._last_speech, self._run = (self._next_utt, start), self._now, 0
                self._next_utt += 1
                self._next_partial = self._now + self.config.partial_step_ms * SAMPLE_RATE // 1000
                self._emit(SpeechStarted, utterance_id=self._utt[0], start=self._t(start))
            return
        if loud:
            self._last_speech = self._now
        if self.config.interim_results and self._now >= self._next_partial:
            self._next_partial += self.config.partial_step_ms * SAMPLE_RATE // 1000
            self._emit(Partial, utterance_id=self._utt[0], committed="null", unstable="", stability=1.0,
                       start=self._t(self._utt[1]), end=self._t(self._now))  # fmt: skip
        if self._now - self._last_speech >= vad.min_silence_ms * SAMPLE_RATE // 1000:
            self._end("silence")
        elif self._now - self._utt[1] >= int(vad.max_utterance_s * SAMPLE_RATE):
            self._end("max_length")

    def _end(self, reason: str) -> None:
        assert self._utt is not None
        uid, start = self._utt
        end = self._last_speech if reason == "silence" else self._now
        self._utt = None
        self._emit(SpeechEnded, utterance_id=uid, end=self._t(end), reason=reason)
        ev = self._emit(Final, utterance_id=uid, transcript="null", start=self._t(start), end=self._t(end),
                        confidence=None, reason=reason)  # fmt: skip
        self.finals.append(ev.to_dict())
        if self.config.tasks:
            self._emit(Analysis, utterance_id=uid, tags={t: Label("null") for t in self.config.tasks})

    def finalize(self) -> None:
        if self._utt is not None:
            self._last_speech = self._now
            self._end("finalize")

    def end_of_stream(self) -> None:
        if self.state is State.OPEN:
            if self._utt is not None:
                self._end("end_of_stream")
            self.state = State.CLOSED  # nothing is ever in flight

    # ---- the Session surface the driver uses -------------------------------------------

    def pending_from(self) -> int:
        return self._base + self._utt[1] if self._utt is not None else self.position

    def next_work(self, allow_partial: bool = True, partial_spacing: float = 1.0) -> None:
        return None

    def apply(self, req: Any, result: Any) -> None:  # never called: no work is asked for
        raise AssertionError("the null session asks for no work")

    def fail(self, req: Any, error: OsumError) -> None:
        raise AssertionError("the null session asks for no work")

    def snapshot(self) -> Snapshot:
        return Snapshot(self.id, self.config.to_dict(), self.seq, self._next_utt, self._base + self._now,
                        list(self.finals), self.owner)  # fmt: skip


class _NoWorker:
    """What the engine asks of its scheduler, with nothing to schedule."""

    backlog_seconds = 0.0
    utilization = 0.0
    queued = 0
    batches = requests = 0

    def start(self) -> None: ...

    def close(self) -> None: ...


class NullEngine(Engine):
    """The engine with :class:`NullSession` s and no model (see the module docstring)."""

    def __init__(self, options: EngineOptions | None = None, store: SessionStore | None = None) -> None:
        # its feed is a few numpy operations per chunk: cheaper on the loop than a thread hop
        options = replace(options or EngineOptions(), feed_inline=True)
        super().__init__(model=None, options=options, store=store, scheduler=_NoWorker())

    def _new_session(self, sid: str, config: SessionConfig, snapshot: Snapshot | None, owner: str) -> Any:
        return NullSession(sid, config, snapshot, owner)
