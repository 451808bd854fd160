"""Long recordings offline: the live session's VAD cuts them into utterances, in-process.

The model's own window is 30 s (Whisper's), so ``osum.inference.recognize`` refuses a longer
clip. A call recording or a lecture is many utterances: this drives one
:class:`~streaming.session.Session` over the whole recording, synchronously and as fast as the
model goes (no event loop, no server), and returns each utterance's Final and Analysis,
exactly what a client streaming the file would have received (without partials; decoded as
the live service decodes: greedy, with the loop guard). Utterances longer than the model's
``max_utterance_s`` (osum-mini's card: 8 s) are split at a quiet point, as in a live stream.

    for seg in transcribe_recording(model, audio, tasks=session_tasks(get_task("sgc"))):
        print(seg.final.start, seg.final.transcript, seg.analysis.tags["gender"].label)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from osum.audio import MAX_FILE_SECONDS, prepare_audio
from osum.decoding import DecodingOptions
from osum.errors import InvalidAudioError
from osum.tasks import Task

from .audio import SAMPLE_RATE, AudioFormat
from .events import Analysis, Error, Final
from .session import Session
from .session_base import SessionConfig
from .work import _KIND, AnalysisRequest, FinalRequest, PartialRequest, run_analyses, run_finals, run_partials

__all__ = ["Segment", "session_tasks", "transcribe_recording"]

_CHUNK = SAMPLE_RATE  # one second per feed: the session's VAD sees the audio as a stream would
# closing silence, longer than the endpointer's default min_silence_ms (600) and speech pad (96),
# so that the last utterance ends on silence as it would live, not at the end of the stream
_TAIL = np.zeros(SAMPLE_RATE, np.float32)


@dataclass(frozen=True)
class Segment:
    """One utterance of a recording: its Final and, if tags or a reply were asked for, its Analysis."""

    final: Final
    analysis: Analysis | None = None

    def to_dict(self) -> dict[str, Any]:
        f = self.final
        d: dict[str, Any] = {"start": f.start, "end": f.end, "transcript": f.transcript, "confidence": f.confidence,
                             "reason": f.reason}  # fmt: skip
        if f.words:
            d["words"] = [{"start": w.start, "end": w.end, "text": w.text} for w in f.words]
        if self.analysis is not None:
            d["tags"] = {k: {"label": v.label, "score": v.score} for k, v in self.analysis.tags.items()}
            if self.analysis.reply is not None:
                d["reply"] = self.analysis.reply
        return d


def session_tasks(task: Task) -> tuple[str, ...]:
    """A task's tag kinds under the session's names (VED's ``event`` is the session's ``events``)."""
    names = {kind: name for name, kind in _KIND.items()}
    return tuple(names[k] for k in task.tags)


def transcribe_recording(model: Any, audio: np.ndarray, *, tasks: tuple[str, ...] = (), chat: bool = False,
                         word_times: bool = False, max_new_tokens: int = 200,
                         decoding: DecodingOptions | None = None) -> list[Segment]:  # fmt: skip
    """The utterances of ``audio`` (16 kHz mono, up to ``MAX_FILE_SECONDS``), in order.

    Args:
        model: a loaded OSUM model (``osum.loading.load_model``).
        tasks: tag kinds to compute after each utterance's Final (``emotion``, ``style``,
            ``events``, ``gender``, ``age``); a kind the model does not support comes back
            as the label ``unsupported``, as in a live stream.
        chat: also the model's reply to each utterance (STTC).
        word_times: each Final's words with their times (models with a word aligner).
        max_new_tokens: the most tokens of one utterance's transcript.
        decoding: how each utterance's transcript is decoded (beam search, OSUM's beam
            sampling); None: greedy, as the live service decodes by default. Each utterance's
            transcript is then what offline recognition of its segment gives with the same options.

    Raises:
        InvalidAudioError / AudioTooLongError: as ``osum.audio.prepare_audio`` (empty, non-finite,
            longer than an hour); InvalidConfigError: an unknown tag kind.
    """
    x = prepare_audio(audio, SAMPLE_RATE, MAX_FILE_SECONDS)
    cfg = SessionConfig(audio=AudioFormat(encoding="float32"), interim_results=False, tasks=tasks, chat=chat,
                        word_times=word_times)  # fmt: skip
    s = Session("recording", cfg, model)
    finals: list[Final] = []
    analyses: dict[int, Analysis] = {}

    def pump() -> None:
        while (req := s.next_work()) is not None:
            if isinstance(req, PartialRequest):  # not asked for; kept for a session that makes them
                s.apply(req, run_partials(model, [req])[0])
            elif isinstance(req, FinalRequest):
                s.apply(req, run_finals(model, [req], max_new_tokens, decoding)[0])
            else:
                assert isinstance(req, AnalysisRequest)
                s.apply(req, run_analyses(model, [req])[0])
        for ev in s.drain():
            if isinstance(ev, Final):
                finals.append(ev)
            elif isinstance(ev, Analysis):
                analyses[ev.utterance_id] = ev
            elif isinstance(ev, Error) and ev.fatal:
                raise InvalidAudioError(f"{ev.code}: {ev.message}")

    x = np.concatenate([x, _TAIL])
    for i in range(0, x.size, _CHUNK):
        s.feed(x[i : i + _CHUNK].tobytes())
        pump()
    s.end_of_stream()
    pump()
    return [Segment(f, analyses.get(f.utterance_id)) for f in finals if f.transcript or f.utterance_id in analyses]
