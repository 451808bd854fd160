"""One live stream, sans-I/O: audio in, model work requests out, results in, events out.

The session never touches the network or runs the model. Its caller (the engine)
feeds it audio and client commands, asks :meth:`Session.next_work` what the model
should do, runs that on the scheduler's worker, and hands the result to
:meth:`Session.apply`; :meth:`Session.drain` returns the events to send::

    audio -> AudioIntake -> Endpointer (silero) -> utterance
          -> IncrementalLogMel -> PartialRequest (chunked encoder, draft-verified decode)
          -> at the endpoint: FinalRequest (full context, = offline) -> AnalysisRequest (tags)

Committed partial text never changes within an utterance (the committed tokens are
forced in every later partial); the Final is computed afresh on the whole utterance
and is what counts. Per utterance, work is strictly ordered: partials, then the
final, then the analysis; utterances are processed in order.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from osum.audio import N_MELS, IncrementalLogMel, normalize_log_mel
from osum.errors import InvalidConfigError, OsumError

from .audio import SAMPLE_RATE, AudioFormat, AudioIntake
from .events import Analysis, Error, Event, Final, Partial, ReplyDelta, SpeechEnded, SpeechStarted, Word
from .vad import Endpointer, VadEvent, VadOptions
from .work import TAG_TASKS, AnalysisRequest, AnalysisResult, FinalRequest, FinalResult, PartialRequest, PartialResult

__all__ = ["SessionConfig", "Session", "SessionBase", "State", "Snapshot"]

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


@dataclass
class _Utterance:
    id: int
    start: int  # stream sample where the utterance audio begins
    audio: list[np.ndarray] = field(default_factory=list)  # set at the end: [start, end)
    n: int = 0  # samples so far
    fed: int = 0  # samples given to the incremental log-mel
    mel: IncrementalLogMel = field(default_factory=IncrementalLogMel)
    mel_max: float = -np.inf
    pending: list[torch.Tensor] = field(default_factory=list)  # raw log-mel frames not yet encoded
    cache: Any = None
    speech: torch.Tensor | None = None
    llm_cache: Any = None  # the LLM's cache of [prompt, begin, speech so far] for partials
    committed: list[int] = field(default_factory=list)
    unstable: list[int] = field(default_factory=list)
    last_hyp: list[int] = field(default_factory=list)
    since_partial: int = 0  # samples since the last partial request
    end: int | None = None
    reason: str = ""
    final_ids: list[int] = field(default_factory=list)
    final_speech: torch.Tensor | None = None
    stage: str = "partial"  # partial -> final -> analysis -> done
    eager_end: int | None = None  # the end an eager final pass was last asked for
    eager: FinalResult | None = None  # its result, used if the utterance does end there


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


class Session(SessionBase):
    """The state machine of one stream. Not thread-safe: drive it from one task."""

    def __init__(self, session_id: str, config: SessionConfig, model: Any, snapshot: Snapshot | None = None,
                 owner: str = "anonymous") -> None:  # fmt: skip
        self.owner = snapshot.owner if snapshot else owner
        self.id = session_id
        limit = getattr(getattr(model, "cfg", None), "max_utterance_s", None)
        if limit is not None and config.vad.max_utterance_s > limit:
            # longer utterances than the model was measured to transcribe are split (at a quiet
            # point, as any split): osum-mini's WER past its limit is 2-3 times its WER below it
            config = dataclasses.replace(config, vad=dataclasses.replace(config.vad, max_utterance_s=limit))
        self.config = config
        self.model = model
        self.intake = AudioIntake(config.audio)
        self.vad = Endpointer(config.vad)
        self.state = State.OPEN
        self.seq = snapshot.seq if snapshot else 0
        self._next_utt = snapshot.next_utterance if snapshot else 0
        self._base = snapshot.audio_offset if snapshot else 0  # stream time of this session object's sample 0
        self.finals: list[dict[str, Any]] = list(snapshot.finals) if snapshot else []
        self._events: list[Event] = []
        self._reply_sent: dict[int, str] = {}  # utterance -> reply text already sent as deltas
        self._utts: list[_Utterance] = []  # open or being finished, in order
        self._in_flight = False
        self._buf = np.zeros(0, dtype=np.float32)  # stream audio from sample _buf_start to _now
        self._buf_start = 0
        self._now = 0
        self._preroll = self.vad._pad + 2 * 512  # a start lies up to pad + one frame before the frame that fired

    # ---- input ------------------------------------------------------------------------

    def finalize(self) -> None:
        """Client Finalize: end the open utterance now (at the last sample received)."""
        if self._open() is not None:
            self.vad.force_end("finalize")
            self._vad_events([VadEvent("end", self._now, "finalize")])

    def end_of_stream(self) -> None:
        """No more audio: finish the open utterance and then close."""
        if self.state is State.OPEN:
            self._consume(self.intake.flush())
            if self._open() is not None:
                self.vad.flush()
                self._vad_events([VadEvent("end", self._now, "end_of_stream")])
            self.state = State.ENDING
            self._maybe_close()

    def _consume(self, x: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, x])
        self._now += x.size
        self._vad_events(self.vad.push(x))
        self._feed_utterances()

    # ---- VAD events and utterance audio -------------------------------------------------

    def _open(self) -> _Utterance | None:
        if self._utts and self._utts[-1].end is None:
            return self._utts[-1]
        return None

    def _vad_events(self, events: list[VadEvent]) -> None:
        for ev in events:
            if ev.kind == "start":
                u = _Utterance(self._next_utt, max(ev.sample, self._buf_start))
                self._next_utt += 1
                self._utts.append(u)
                self._emit(SpeechStarted, utterance_id=u.id, start=self._t(u.start))
                continue
            u = self._open()
            if u is None:
                continue
            self._feed_utterances()  # while still open, so that its audio stays buffered
            end = max(ev.sample, u.start)
            u.audio = [self._slice(u.start, end)]
            u.end, u.reason, u.n = end, ev.reason, end - u.start
            self._emit(SpeechEnded, utterance_id=u.id, end=self._t(u.end), reason=ev.reason)
            if ev.reason == "too_short" or u.n < 1600:
                self._utts.remove(u)  # nothing to transcribe: a click or a breath
            else:
                u.stage = "final"
                if u.eager_end != end:
                    u.eager = None  # computed for an end that did not happen
                self._use_eager(u)
        self._feed_utterances()

    def _slice(self, start: int, end: int) -> np.ndarray:
        return self._buf[start - self._buf_start : end - self._buf_start].copy()

    def _feed_utterances(self) -> None:
        """Give the open utterance its new audio (log-mel for partials); trim the stream buffer."""
        u = self._open()
        if u is not None:
            x = self._slice(u.start + u.fed, self._now)
            if x.size:
                u.fed += x.size
                u.n = u.fed
                u.since_partial += x.size
                if self.config.partial_context == "chunked":  # full-context partials take the audio itself
                    frames = u.mel.push(x)
                    if frames.shape[1]:
                        u.mel_max = max(u.mel_max, float(frames.max()))
                        u.pending.append(frames)
        # keep the open utterance's audio, else enough pre-roll for the next start
        keep_from = u.start if u is not None else self._now - self._preroll
        keep_from = max(keep_from, self._buf_start)
        self._buf = self._buf[keep_from - self._buf_start :]
        self._buf_start = keep_from

    def pending_from(self) -> int:
        return self._base + self._utts[0].start if self._utts else self.position

    def queued_samples(self) -> int:
        return sum(u.n for u in self._utts if u.end is not None)

    # ---- work -------------------------------------------------------------------------

    def next_work(self, allow_partial: bool = True, partial_spacing: float = 1.0
                  ) -> FinalRequest | AnalysisRequest | PartialRequest | None:  # fmt: skip
        """The next request for the model, or None. At most one is in flight per session.

        ``allow_partial=False`` (the worker lags real time) skips partials; their audio is
        encoded with the next one that runs. ``partial_spacing`` (>= 1: the worker is busy)
        stretches the step between partials by that factor.
        """
        if self._in_flight or not self._utts:
            return None
        u = self._utts[0]
        req: FinalRequest | AnalysisRequest | PartialRequest | None = None
        if u.stage == "final":
            req = FinalRequest(np.concatenate(u.audio)[: u.n], draft=list(u.last_hyp), words=self.config.word_times)
        elif u.stage == "analysis":
            assert u.final_speech is not None
            req = AnalysisRequest(u.final_speech, u.final_ids, tuple(self.config.tasks), chat=self.config.chat,
                                  utterance_id=u.id)  # fmt: skip
        elif u.stage == "partial" and allow_partial and (end := self._eager_end(u)) is not None:
            u.eager_end, u.eager = end, None
            req = FinalRequest(self._slice(u.start, end), draft=list(u.last_hyp), words=self.config.word_times)
        elif (u.stage == "partial" and allow_partial and self.config.interim_results
              and u.since_partial >= self.config.partial_due(u.n) * max(1.0, partial_spacing) and not self._awaiting_endpoint(u)):  # fmt: skip
            req = self._partial_request(u)
        if req is not None:
            self._in_flight = True
        return req

    def _use_eager(self, u: _Utterance) -> None:
        """At the endpoint, the eager pass's result if it was computed on exactly this audio.
        Not while a request is in flight: its result belongs to this utterance, which must
        still be there (it waits until that request is applied)."""
        if u.stage == "final" and u.eager is not None and u.eager_end == u.end and not self._in_flight:
            result, u.eager = u.eager, None
            self._apply_final(u, result)

    def _awaiting_endpoint(self, u: _Utterance) -> bool:
        """Silence has begun after the open utterance's speech, and with eager finals on, the
        final pass for its likely end comes within ``eager_after_ms`` (or has run). A partial
        now would add only silence, refine nothing that Final does not supersede, and hold the
        worker when the eager pass or the endpoint comes (each waits for work in flight):
        measured, Final P50 1.19 -> 0.94 s for one osum-mini stream (docs/streaming.md)."""
        return self.config.eager_after_ms is not None and u is self._open() and self.vad.trailing_silence_ms > 0

    def _eager_end(self, u: _Utterance) -> int | None:
        """The open utterance's likely end, if an eager final pass should start for it now."""
        after = self.config.eager_after_ms
        if after is None or u is not self._open():
            return None
        end = self.vad.tentative_end(after)
        return end if end is not None and end != u.eager_end and end - u.start >= 1600 else None

    def _partial_request(self, u: _Utterance) -> PartialRequest:
        u.since_partial = 0
        if self.config.partial_context == "full":  # the utterance so far, encoded anew by the worker
            empty = torch.zeros(0, self.model.cfg.llm_dim)
            return PartialRequest(torch.zeros(N_MELS, 0), None, empty, list(u.committed), list(u.unstable),
                                  max_new_tokens=self.config.max_partial_tokens, audio=self._slice(u.start, self._now))  # fmt: skip
        raw = torch.cat(u.pending, dim=1) if u.pending else torch.zeros(N_MELS, 0)
        u.pending = []
        if u.cache is None:
            u.cache = self.model.init_stream(self.config.chunk_frames, self.config.left_chunks)
        speech = u.speech if u.speech is not None else torch.zeros(0, self.model.cfg.llm_dim)
        # partials normalise with the running maximum; the Final recomputes with the true one
        llm_cache, u.llm_cache = u.llm_cache, None  # lent to the request; its result hands it back
        return PartialRequest(normalize_log_mel(raw, u.mel_max), u.cache, speech, list(u.committed), list(u.unstable),
                              max_new_tokens=self.config.max_partial_tokens, llm_cache=llm_cache)  # fmt: skip

    def apply(self, req: Any, result: Any) -> None:
        """The result of the request last returned by :meth:`next_work`."""
        self._in_flight = False
        u = self._utts[0]
        if isinstance(result, PartialResult):
            self._apply_partial(u, result)
        elif isinstance(result, FinalResult):
            end = u.start + req.audio.size
            if u.end is None:  # an eager pass; the utterance is still open
                u.eager = result if end == u.eager_end else None
            elif end == u.end and u.stage == "final":
                self._apply_final(u, result)
            # else: an eager pass for an end that did not happen; next_work asks for the real one
        elif isinstance(result, AnalysisResult):
            self._reply_sent.pop(u.id, None)
            self._emit(Analysis, utterance_id=u.id, tags=result.tags, reply=result.reply)
            self._done(u)
        if self._utts:
            self._use_eager(self._utts[0])  # an endpoint that came while this request was running
        self._maybe_close()

    def fail(self, req: Any, error: OsumError) -> None:
        """The request could not be run (over capacity, model error): report and move on."""
        self._in_flight = False
        u = self._utts[0]
        if isinstance(req, FinalRequest) and u.start + req.audio.size != u.end:
            return  # an eager pass: nothing is lost, the real final pass follows and reports for itself
        self._error(error.code, str(error))
        if isinstance(req, (FinalRequest, AnalysisRequest)):
            self._done(u)  # nothing more can be said of this utterance
        self._maybe_close()

    def _apply_partial(self, u: _Utterance, r: PartialResult) -> None:
        u.cache, u.speech, u.llm_cache = r.cache, r.speech, r.llm_cache
        if u.stage not in ("partial", "final"):
            return  # the Final was already sent: it supersedes this partial
        hyp = r.tokens
        # LocalAgreement-2: commit what two consecutive hypotheses agree on
        agree = 0
        while agree < min(len(hyp), len(u.last_hyp)) and hyp[agree] == u.last_hyp[agree]:
            agree += 1
        agree = max(agree, len(u.committed))
        u.committed, u.unstable, u.last_hyp = hyp[:agree], hyp[agree:], hyp
        tok = self.model.tokenizer
        committed, full = tok.decode(u.committed), tok.decode(hyp)
        self._emit(Partial, utterance_id=u.id, committed=committed, unstable=full[len(committed):],
                   stability=len(u.committed) / max(len(hyp), 1), start=self._t(u.start), end=self._t(u.start + u.n))  # fmt: skip

    def _apply_final(self, u: _Utterance, r: FinalResult) -> None:
        assert u.end is not None
        t0 = self._t(u.start)
        words = tuple(Word(w.text, round(t0 + w.start, 3), round(t0 + w.end, 3)) for w in r.words)
        ev = self._emit(Final, utterance_id=u.id, transcript=r.text, start=t0, end=self._t(u.end),
                        confidence=r.confidence, reason=u.reason, words=words)  # fmt: skip
        self.finals.append(ev.to_dict())
        u.final_ids, u.final_speech = r.tokens, r.speech
        if (self.config.tasks or self.config.chat) and r.tokens:
            u.stage = "analysis"
        else:
            self._done(u)

    def _done(self, u: _Utterance) -> None:
        u.stage = "done"
        self._utts.remove(u)

    def _maybe_close(self) -> None:
        if self.state is State.ENDING and not self._utts and not self._in_flight:
            self.state = State.CLOSED

    def reply_so_far(self, utterance_id: int, text: str) -> None:
        """Voice chat: the reply being written; emits the new part as a ReplyDelta.

        Append-only: a trailing half character (U+FFFD while a multi-byte character is split
        over tokens) is held back until it is complete."""
        sent = self._reply_sent.get(utterance_id, "")
        text = text.rstrip("\ufffd")
        if len(text) > len(sent) and text.startswith(sent):
            self._reply_sent[utterance_id] = text
            self._emit(ReplyDelta, utterance_id=utterance_id, delta=text[len(sent):])

    def snapshot(self) -> Snapshot:
        return Snapshot(self.id, self.config.to_dict(), self.seq, self._next_utt,
                        self._base + self._now, list(self.finals), self.owner)  # fmt: skip
