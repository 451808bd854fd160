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
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from osum.audio import N_MELS, IncrementalLogMel, normalize_log_mel
from osum.errors import OsumError

from .audio import AudioIntake
from .events import Analysis, Event, Final, Partial, ReplyDelta, SpeechEnded, SpeechStarted, Word
from .session_base import SessionBase, SessionConfig, Snapshot, State
from .vad import Endpointer, VadEvent
from .work import AnalysisRequest, AnalysisResult, FinalRequest, FinalResult, PartialRequest, PartialResult

__all__ = ["Session"]

log = logging.getLogger("streaming.session")


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
