"""The sans-I/O session on real speech with the tiny model, driven inline (no threads, no network)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from osum.decoding import DecodingOptions
from osum.errors import InvalidConfigError
from osum.inference import recognize
from streaming.audio import AudioFormat
from streaming.events import Analysis, Error, Final, Partial, SpeechEnded, SpeechStarted
from streaming.session import Session
from streaming.session_base import SessionConfig, Snapshot, State
from streaming.vad import VadOptions
from streaming.work import AnalysisRequest, FinalRequest, PartialRequest, run_analyses, run_finals, run_partials

SIL = np.zeros(16000, np.float32)
FINAL_TOKENS = 12


def _pump(s: Session, model, on_partial=None, spacing: float = 1.0) -> None:  # type: ignore[no-untyped-def]
    """Run the session's requests until it has none; ``on_partial(req)`` sees each partial first."""
    while (req := s.next_work(partial_spacing=spacing)) is not None:
        if isinstance(req, PartialRequest):
            if on_partial is not None:
                on_partial(req)
            res = run_partials(model, [req])[0]
        elif isinstance(req, FinalRequest):
            res = run_finals(model, [req], max_new_tokens=FINAL_TOKENS)[0]
        else:
            assert isinstance(req, AnalysisRequest)
            res = run_analyses(model, [req])[0]
        s.apply(req, res)


def _stream(s: Session, model, audio: np.ndarray, chunk: int = 3200, end: bool = True, on_partial=None,  # type: ignore[no-untyped-def]
            spacing: float = 1.0) -> list:  # fmt: skip
    if s.config.audio.encoding == "float32":
        pcm = np.asarray(audio, "<f4").tobytes()
    else:
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    events = []
    for i in range(0, len(pcm), chunk):
        s.feed(pcm[i : i + chunk])
        _pump(s, model, on_partial, spacing)
        events += s.drain()
    if end:
        s.end_of_stream()
        _pump(s, model, on_partial, spacing)
        events += s.drain()
    return events


CFG = SessionConfig(max_partial_tokens=6, tasks=("emotion", "gender"))


def test_event_order_and_finals_equal_offline(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    x = np.concatenate([SIL, male_clip, SIL, SIL, female_clip, SIL])
    pcm_x = (np.clip(x, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0  # what the session hears
    s = Session("s", CFG, tiny_model)
    events = _stream(s, tiny_model, x)
    assert s.state is State.CLOSED
    assert [e.seq for e in events] == list(range(len(events)))
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.utterance_id for f in finals] == [0, 1]
    for f in finals:
        seg = pcm_x[round(f.start * 16000) : round(f.end * 16000)]
        offline = recognize(tiny_model, [seg], "asr", DecodingOptions(max_new_tokens=FINAL_TOKENS), score_tags=False)[0]
        assert f.transcript == offline.transcript
    for uid in (0, 1):  # per utterance: started, partials, ended, final, analysis
        kinds = [type(e) for e in events if getattr(e, "utterance_id", None) == uid]
        assert kinds[0] is SpeechStarted and kinds[-2:] == [Final, Analysis] and SpeechEnded in kinds
        assert Partial in kinds
    analysis = [e for e in events if isinstance(e, Analysis)][0]
    assert set(analysis.tags) == {"emotion", "gender"}
    assert sum(analysis.tags["emotion"].scores.values()) == pytest.approx(1.0, abs=1e-4)  # type: ignore[union-attr]


def test_finals_decode_with_the_servers_options_as_offline(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    """Finals with decoding options (OSUM's beam sampling here) are offline recognition of
    their segment with the same options, not the greedy draft path's transcript."""
    x = np.concatenate([SIL, male_clip, SIL, SIL, female_clip, SIL])
    pcm_x = (np.clip(x, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0
    paper = replace(DecodingOptions.osum_paper(), max_new_tokens=FINAL_TOKENS)
    s = Session("s", SessionConfig(max_partial_tokens=6, tasks=()), tiny_model)
    events, pcm = [], (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    for i in range(0, len(pcm) + 1, 3200):
        if i < len(pcm):
            s.feed(pcm[i : i + 3200])
        else:
            s.end_of_stream()
        while (req := s.next_work()) is not None:
            if isinstance(req, PartialRequest):
                s.apply(req, run_partials(tiny_model, [req])[0])
            else:
                assert isinstance(req, FinalRequest) and req.draft  # a draft there was, and it goes unused
                s.apply(req, run_finals(tiny_model, [req], FINAL_TOKENS, paper)[0])
        events += s.drain()
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.utterance_id for f in finals] == [0, 1]
    differs = 0
    for f in finals:
        seg = pcm_x[round(f.start * 16000) : round(f.end * 16000)]
        assert f.transcript == recognize(tiny_model, [seg], "asr", paper, score_tags=False)[0].transcript
        greedy = recognize(tiny_model, [seg], "asr", DecodingOptions(max_new_tokens=FINAL_TOKENS), score_tags=False)[0]
        differs += f.transcript != greedy.transcript
    assert differs  # the options were used: greedy reads these segments otherwise


def test_committed_text_only_grows(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    s = Session("s", SessionConfig(max_partial_tokens=8, tasks=()), tiny_model)
    events = _stream(s, tiny_model, np.concatenate([SIL, male_clip, male_clip, SIL]))
    partials = [e for e in events if isinstance(e, Partial)]
    assert len(partials) >= 8
    for uid in {p.utterance_id for p in partials}:
        mine = [p for p in partials if p.utterance_id == uid]
        for a, b in zip(mine, mine[1:]):
            assert b.committed.startswith(a.committed)
    assert any(p.committed for p in partials)  # something was committed


def test_finalize_ends_the_utterance_now(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    s = Session("s", CFG, tiny_model)
    events = _stream(s, tiny_model, np.concatenate([SIL, male_clip[:32000]]), end=False)
    assert not any(isinstance(e, Final) for e in events)
    s.finalize()
    _pump(s, tiny_model)
    events = s.drain()
    final = [e for e in events if isinstance(e, Final)][0]
    assert final.reason == "finalize" and final.end == pytest.approx(3.0, abs=0.01)
    assert s.state is State.OPEN  # the stream goes on


def test_bad_input_is_reported_and_the_session_goes_on(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    s = Session("s", SessionConfig(audio=AudioFormat(encoding="float32"), tasks=()), tiny_model)
    s.feed(np.array([np.nan] * 100, np.float32).tobytes())
    s.feed(b"\x00" * (11 << 20))  # 11 MB in one chunk
    s.feed(b"\x00\x00\x80")  # not a whole float: kept for the next chunk
    errors = [e for e in s.drain() if isinstance(e, Error)]
    assert [e.code for e in errors] == ["invalid_audio", "invalid_audio"] and not any(e.fatal for e in errors)
    s.feed(b"\x3f")  # completes the float (1.0)
    events = _stream(s, tiny_model, np.concatenate([SIL, male_clip, SIL]).astype(np.float32) * 0.5, end=True)
    assert any(isinstance(e, Final) for e in events)  # a normal utterance right after works


def test_silence_keeps_memory_bounded(tiny_model) -> None:  # type: ignore[no-untyped-def]
    s = Session("s", CFG, tiny_model)
    events = _stream(s, tiny_model, np.zeros(16000 * 120, np.float32), chunk=64000, end=False)
    assert events == [] and s._buf.size <= s._preroll + 32000


def test_resume_from_snapshot_continues_numbering(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    s = Session("s", CFG, tiny_model)
    first = _stream(s, tiny_model, np.concatenate([SIL, male_clip, SIL]), end=False)
    snap = s.snapshot()
    again = Snapshot(**snap.__dict__)  # a plain copy, as the store would return it
    assert again.finals and again.seq == first[-1].seq + 1
    r = Session("s", SessionConfig.from_dict(again.config), tiny_model, snapshot=again)
    later = _stream(r, tiny_model, np.concatenate([SIL, male_clip, SIL]))
    assert later[0].seq == snap.seq
    final = [e for e in later if isinstance(e, Final)][0]
    assert final.utterance_id == 1 and final.start > snap.audio_offset / 16000
    assert r.finals[0] == snap.finals[0] and len(r.finals) == 2


@pytest.mark.parametrize("kwargs", [dict(partial_step_ms=100), dict(tasks=("karaoke",)), dict(max_partial_tokens=0),
                                    dict(partial_context="causal")])
def test_config_validated(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidConfigError):
        SessionConfig(**kwargs)


def test_draft_verification_accepts_a_correct_draft_in_one_pass(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """The previous hypothesis, given as the draft, is verified without decoding and changes nothing."""
    import torch

    from osum.audio import log_mel

    mel = log_mel(male_clip)[:, :240]
    req = PartialRequest(mel, tiny_model.init_stream(24), torch.zeros(0, tiny_model.cfg.llm_dim), [], [], max_new_tokens=8)
    scratch = run_partials(tiny_model, [req])[0]
    assert len(scratch.tokens) == 8 and scratch.verified == 0
    again = run_partials(tiny_model, [PartialRequest(mel, req.cache, req.speech, [], scratch.tokens, max_new_tokens=8)])[0]
    assert again.tokens == scratch.tokens and again.verified == 8
    # a wrong draft is cut at its first wrong token and decoding resumes from there
    wrong = scratch.tokens[:3] + [(scratch.tokens[3] + 1) % 1000] + scratch.tokens[4:]
    fixed = run_partials(tiny_model, [PartialRequest(mel, req.cache, req.speech, [], wrong, max_new_tokens=8)])[0]
    assert fixed.verified == 3 and fixed.tokens == scratch.tokens
    # committed tokens are forced even where the model would disagree
    forced = run_partials(tiny_model, [PartialRequest(mel, req.cache, req.speech, wrong[:4], [], max_new_tokens=8)])[0]
    assert forced.tokens[:4] == wrong[:4]


def test_chat_reply_and_unsupported_tasks(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """STTC's reply comes in the Analysis; kinds a model lacks are 'unsupported', never invented."""
    from dataclasses import replace

    from streaming.events import UNSUPPORTED

    s = Session("s", SessionConfig(max_partial_tokens=4, tasks=("emotion",), chat=True), tiny_model)
    events = _stream(s, tiny_model, np.concatenate([SIL, male_clip, SIL]))
    analysis = [e for e in events if isinstance(e, Analysis)][0]
    assert analysis.reply  # the random model says something; the point is that it is generated
    original = tiny_model.cfg
    try:
        tiny_model.cfg = replace(original, supported_tasks=("asr", "sgc"))
        s = Session("s", SessionConfig(max_partial_tokens=4, tasks=("emotion", "gender"), chat=True), tiny_model)
        analysis = [e for e in _stream(s, tiny_model, np.concatenate([SIL, male_clip, SIL])) if isinstance(e, Analysis)][0]
    finally:
        tiny_model.cfg = original
    assert analysis.tags["emotion"].label == UNSUPPORTED and analysis.tags["emotion"].score is None
    assert analysis.tags["chat"].label == UNSUPPORTED and analysis.reply is None
    assert analysis.tags["gender"].label in ("male", "female") and analysis.tags["gender"].score is not None


def test_partials_of_many_sessions_decode_as_one_batch(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """Batched partials (one verifying pass, shared greedy steps, rejected drafts masked) give
    each session the hypothesis it gets alone: different lengths, drafts, forced tokens."""
    import torch

    from osum.audio import log_mel
    from streaming.drafts import verify_and_decode_batch

    mel = log_mel(male_clip)
    empty = torch.zeros(0, tiny_model.cfg.llm_dim)

    def req(frames: int, committed: list[int], draft: list[int], n: int) -> PartialRequest:
        return PartialRequest(mel[:, :frames], tiny_model.init_stream(frames // 10), empty, committed, draft, max_new_tokens=n)

    alone = run_partials(tiny_model, [req(240, [], [], 8)])[0].tokens
    wrong = alone[:3] + [(alone[3] + 1) % 1000] + alone[4:]
    reqs = [req(240, [], alone, 8), req(240, [], wrong, 8), req(160, [], [], 6), req(240, wrong[:4], [], 10), req(80, [], [], 5)]
    single = [run_partials(tiny_model, [r])[0] for r in reqs]
    together = run_partials(tiny_model, reqs)  # on CPU: one by one, each on its own LLM cache
    assert [r.tokens for r in together] == [r.tokens for r in single]
    assert all(torch.equal(a.speech, b.speech) for a, b in zip(together, single))
    with torch.inference_mode():  # the batched form (what CUDA uses), on the same inputs
        batched = verify_and_decode_batch(tiny_model, [r.speech for r in single], [q.committed for q in reqs],
                                          [q.draft for q in reqs], [q.max_new_tokens for q in reqs])  # fmt: skip
    assert [t for t, _, _ in batched] == [r.tokens for r in single]
    assert [v for _, _, v in batched] == [r.verified for r in single] == [8, 3, 0, 0, 0]
    assert [len(t) for t, _, _ in batched] == [8, 8, 6, 10, 5]


def _run_counting(s: Session, model, audio: np.ndarray) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    """Stream in 100 ms chunks; returns events and, per model request, (kind, audio samples of a
    FinalRequest, whether its utterance was still open: an eager pass)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    events, ran = [], []
    for i in range(0, len(pcm), 3200):
        s.feed(pcm[i : i + 3200])
        while (req := s.next_work()) is not None:
            final = isinstance(req, FinalRequest)
            ran.append((type(req).__name__, req.audio.size if final else 0, final and s._utts[0].end is None))
            if isinstance(req, PartialRequest):
                s.apply(req, run_partials(model, [req])[0])
            elif isinstance(req, FinalRequest):
                s.apply(req, run_finals(model, [req], max_new_tokens=FINAL_TOKENS)[0])
            else:
                s.apply(req, run_analyses(model, [req])[0])
        events += s.drain()
    return events, ran


def test_eager_final_is_ready_when_the_endpoint_fires(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """The final pass starts after 200 ms of silence on the audio the endpoint will keep, so the
    Final comes with SpeechEnded, with no model work left; it still equals offline recognition."""
    x = np.concatenate([SIL, male_clip, SIL])
    pcm_x = (np.clip(x, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0
    s = Session("s", SessionConfig(max_partial_tokens=4, tasks=()), tiny_model)
    events, ran = _run_counting(s, tiny_model, x)
    finals = [e for e in events if isinstance(e, Final)]
    passes = [eager for k, _, eager in ran if k == "FinalRequest"]
    assert len(finals) == 1 and passes == [True]  # one final pass, started before the endpoint
    ended = next(i for i, e in enumerate(events) if isinstance(e, SpeechEnded))
    assert isinstance(events[ended + 1], Final)  # in the same drain as the endpoint
    f = finals[0]
    offline = recognize(tiny_model, [pcm_x[round(f.start * 16000) : round(f.end * 16000)]], "asr",
                        DecodingOptions(max_new_tokens=FINAL_TOKENS), score_tags=False)[0]  # fmt: skip
    assert f.transcript == offline.transcript
    # off: the final pass runs only after the endpoint
    s = Session("s", SessionConfig(max_partial_tokens=4, tasks=(), eager_final_ms=0), tiny_model)
    events_off, ran_off = _run_counting(s, tiny_model, x)
    assert [e.transcript for e in events_off if isinstance(e, Final)] == [f.transcript]
    assert [eager for k, _, eager in ran_off if k == "FinalRequest"] == [False]


def test_eager_final_discarded_when_speech_resumes(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A 400 ms pause starts an eager pass; speech resumes, so it is dropped and the Final covers
    the whole utterance, equal to offline recognition of it."""
    x = np.concatenate([SIL, male_clip[:24000], np.zeros(6400, np.float32), male_clip[24000:], SIL])
    pcm_x = (np.clip(x, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0
    s = Session("s", SessionConfig(max_partial_tokens=4, tasks=()), tiny_model)
    events, ran = _run_counting(s, tiny_model, x)
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 1
    passes = [(n, eager) for k, n, eager in ran if k == "FinalRequest"]
    assert len(passes) >= 2 and passes[0][1] and passes[0][0] < passes[-1][0]  # the early pass covered only the first part
    f = finals[0]
    assert f.start < 2.5 and f.end > 2.9 + 0.5  # one utterance across the pause (2.5 s to 2.9 s)
    offline = recognize(tiny_model, [pcm_x[round(f.start * 16000) : round(f.end * 16000)]], "asr",
                        DecodingOptions(max_new_tokens=FINAL_TOKENS), score_tags=False)[0]  # fmt: skip
    assert f.transcript == offline.transcript


def test_no_partial_after_the_eager_pass_so_the_final_comes_with_the_endpoint(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """Once the eager pass for the likely end is done, only silence follows: the session asks
    for no partial until the endpoint (one would hold the worker when it comes, and the Final
    would wait for it), and the Final comes in the same drain as SpeechEnded."""
    s = Session("s", SessionConfig(max_partial_tokens=4, tasks=(), partial_step_ms=160), tiny_model)
    pcm = (np.clip(np.concatenate([SIL, male_clip, SIL, SIL]), -1, 1) * 32767).astype("<i2").tobytes()
    asked: list[str] = []
    ended_with_final = None
    for i in range(0, len(pcm), 1600):
        s.feed(pcm[i : i + 1600])
        while (req := s.next_work()) is not None:
            u = s._utts[0]
            asked.append("eager" if isinstance(req, FinalRequest) and u.end is None else type(req).__name__)
            if isinstance(req, FinalRequest):
                s.apply(req, run_finals(tiny_model, [req], max_new_tokens=FINAL_TOKENS)[0])
            else:
                s.apply(req, run_partials(tiny_model, [req])[0])
        events = s.drain()
        if any(isinstance(e, SpeechEnded) for e in events):
            ended_with_final = any(isinstance(e, Final) for e in events)
    assert "eager" in asked and "FinalRequest" not in asked  # the eager result was the Final
    assert "PartialRequest" in asked[: asked.index("eager")] and "PartialRequest" not in asked[asked.index("eager") :]
    assert ended_with_final  # at the endpoint, at once


def test_partials_reuse_the_sessions_llm_cache(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A lone partial computes only its new speech frames and text on top of the cache its
    session kept from the previous partial, and gets the tokens a full recomputation gets."""
    import torch

    from osum.audio import log_mel
    from osum.tasks import get_task
    from streaming.drafts import verify_and_decode

    mel = log_mel(male_clip)
    stream = tiny_model.init_stream(24)
    speech, kv, committed, draft = torch.zeros(0, tiny_model.cfg.llm_dim), None, [], []
    for i, step in enumerate(range(0, 480, 96)):
        req = PartialRequest(mel[:, step : step + 96], stream, speech, committed, draft, max_new_tokens=6, llm_cache=kv)
        res = run_partials(tiny_model, [req])[0]
        assert res.speech.shape[0] > speech.shape[0]  # new frames every step
        with torch.inference_mode():
            full = verify_and_decode(tiny_model, res.speech, committed, draft, 6)[0]  # everything recomputed
        assert res.tokens == full
        prompt = tiny_model.tokenizer.encode(get_task("asr").prompt, add_special_tokens=False)
        assert res.llm_cache is not None and res.llm_cache.get_seq_length() == len(prompt) + 1 + res.speech.shape[0]
        stream, speech, kv = res.cache, res.speech, res.llm_cache
        committed, draft = res.tokens[: i], res.tokens[i:]  # some committed, the rest as the next draft
    # a wrong draft: cut at the wrong token, decoding resumes there, the cache goes back to the prefix
    with torch.inference_mode():
        greedy = verify_and_decode(tiny_model, speech, [], [], 6)[0]
    wrong = greedy[:2] + [(greedy[2] + 1) % 1000] + greedy[3:]
    again = run_partials(tiny_model, [PartialRequest(mel[:, :0], stream, speech, [], wrong, max_new_tokens=6, llm_cache=kv)])[0]
    with torch.inference_mode():
        assert again.tokens == verify_and_decode(tiny_model, speech, [], wrong, 6)[0]
    assert again.verified == 2 and again.llm_cache.get_seq_length() == len(prompt) + 1 + speech.shape[0]


def _non_speech(seconds: float = 6.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    spectrum = np.fft.rfft(rng.standard_normal(t.size))
    pink = np.fft.irfft(spectrum / np.sqrt(np.arange(spectrum.size) + 1), t.size)
    notes = np.array([261.6, 329.6, 392.0, 523.3, 440.0, 349.2])[(t // 1).astype(int) % 6]  # a note a second
    chords = sum(np.sin(2 * np.pi * notes * h * t) / h for h in range(1, 6))
    return {
        "white noise": 0.5 * rng.standard_normal(t.size).clip(-2, 2),
        "pink noise": 0.25 * pink / np.abs(pink).max(),
        "clicks": np.where(np.arange(t.size) % 3200 < 40, 0.8, 0.0) * rng.standard_normal(t.size),
        "chords": 0.5 * chords / np.abs(chords).max(),
        "dual tones": 0.3 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t)) * (t % 0.5 < 0.25),
    }


@pytest.mark.parametrize("kind", ["white noise", "pink noise", "clicks", "chords", "dual tones"])
def test_non_speech_makes_no_transcript(tiny_model, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Noise, clicks, music and tones give the model nothing to transcribe: silero-vad does not
    hear speech in them, or only for less than the minimum speech (dropped as too short), so no
    Final can be a hallucination on them (what users of Whisper-based services complain of)."""
    x = np.concatenate([SIL, _non_speech()[kind].astype(np.float32), SIL])
    s = Session("s", CFG, tiny_model)
    events = _stream(s, tiny_model, x)
    assert not [e for e in events if isinstance(e, (Final, Partial))]
    assert all(e.reason == "too_short" for e in events if isinstance(e, SpeechEnded))
    assert s.state is State.CLOSED


def test_full_context_partials_are_offline_recognition_of_the_audio_so_far(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A full-context partial encodes the utterance so far as a Final would (each alone), forces
    the committed tokens and verifies the draft; with nothing committed it is greedy decoding
    from scratch whatever the draft. Mixed with chunked requests, each gets its own result."""
    import torch

    from osum.audio import log_mel
    from streaming.drafts import verify_and_decode

    empty = torch.zeros(0, tiny_model.cfg.llm_dim)

    def full(n: int, committed: list[int], draft: list[int]) -> PartialRequest:
        return PartialRequest(torch.zeros(0, 0), None, empty, committed, draft, max_new_tokens=6, audio=male_clip[:n])

    def offline(n: int, committed: list[int], draft: list[int]) -> list[int]:
        with torch.inference_mode():
            speech, lengths = tiny_model.encode_each([log_mel(male_clip[:n])])
            return verify_and_decode(tiny_model, speech[0, : int(lengths[0])], committed, draft, 6)[0]

    scratch = run_partials(tiny_model, [full(24000, [], [])])[0]
    assert scratch.tokens == offline(24000, [], []) and scratch.cache is None and scratch.llm_cache is None
    wrong = scratch.tokens[:2] + [(scratch.tokens[2] + 1) % 1000] + scratch.tokens[3:]
    checked = run_partials(tiny_model, [full(24000, [], wrong)])[0]
    assert checked.tokens == scratch.tokens and checked.verified == 2  # the wrong draft cut where it errs
    forced = [(scratch.tokens[0] + 7) % 1000]
    chunked = PartialRequest(log_mel(male_clip)[:, :96], tiny_model.init_stream(24), empty, [], [], max_new_tokens=6)
    alone = run_partials(tiny_model, [chunked])[0].tokens
    chunked = PartialRequest(log_mel(male_clip)[:, :96], tiny_model.init_stream(24), empty, [], [], max_new_tokens=6)
    mixed = run_partials(tiny_model, [full(16000, forced, []), chunked, full(24000, [], [])])
    assert mixed[0].tokens == offline(16000, forced, []) and mixed[0].tokens[0] == forced[0]
    assert mixed[1].tokens == alone and mixed[1].cache is not None
    assert mixed[2].tokens == scratch.tokens


@pytest.mark.parametrize("context", ["full", "chunked"])
def test_a_session_asks_for_the_partials_its_config_names(tiny_model, male_clip, context) -> None:  # type: ignore[no-untyped-def]
    """Full context (the default): each partial carries the utterance's audio so far and no
    encoder state; chunked: only new log-mel frames on the session's caches."""
    s = Session("s", SessionConfig(max_partial_tokens=4, tasks=(), partial_context=context), tiny_model)
    partials = []

    def check(req: PartialRequest) -> None:
        partials.append(req)
        if context == "full":
            assert req.audio is not None and req.audio.size == s._now - s._utts[0].start and req.cache is None
        else:
            assert req.audio is None and req.cache is not None

    _stream(s, tiny_model, np.concatenate([SIL, male_clip, SIL]), chunk=1600, end=False, on_partial=check)
    assert len(partials) >= 2


@pytest.mark.parametrize("growth", [0.0, 0.1, 0.25])
def test_full_context_partials_space_out_as_the_utterance_grows(tiny_model, male_clip, growth) -> None:  # type: ignore[no-untyped-def]
    """A full-context partial costs in proportion to the utterance so far; its step grows to
    ``partial_growth`` of that length, so the partials' work over a long utterance stays
    proportional to its length. 0 keeps the fixed step."""
    cfg = SessionConfig(vad=VadOptions(min_silence_ms=1500), max_partial_tokens=4, tasks=(), partial_growth=growth,
                        eager_final_ms=0)  # fmt: skip
    s = Session("s", cfg, tiny_model)
    gap = np.full(1600, 1e-4, np.float32)  # 100 ms, and the clip's own pauses: under the endpoint's silence
    talk = np.concatenate([SIL] + [x for _ in range(4) for x in (male_clip, gap)] + [SIL])  # ~16 s of speech
    sizes: list[int] = []
    _stream(s, tiny_model, talk, chunk=1600, end=False, on_partial=lambda req: sizes.append(req.audio.size))  # 50 ms at a time
    assert len(s.finals) == 1 and s.finals[0]["end"] - s.finals[0]["start"] > 14  # one long utterance
    steps = np.diff(sizes)
    due = np.array([cfg.partial_due(n) for n in sizes[1:]])
    assert (steps >= due).all() and (steps < due + 800 + 7680).all()  # due, give or take a feed and a skipped one
    if growth == 0:
        assert (due == 7680).all()
    else:
        assert due[-1] >= growth * 14 * 16000 and steps[-1] > 2 * 7680
        # up to L0 = step / growth, one per step; then each at 1 / (1 - growth) times the last
        l0 = 7680 / growth
        assert len(sizes) <= l0 / 7680 + np.log(sizes[-1] / l0) / -np.log(1 - growth) + 1 < 0.7 * sizes[-1] / 7680


def test_partial_growth_validated() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidConfigError):
            SessionConfig(partial_growth=bad)
    assert SessionConfig(partial_context="chunked", partial_growth=0.5).partial_due(16000 * 20) == 480 * 16  # chunked: fixed


def test_utterances_are_split_at_the_models_measured_limit(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A model whose card gives ``max_utterance_s`` (osum-mini: the longest it transcribes
    well) caps the session's split length below the client's; a lower client value stays."""
    import copy
    from dataclasses import replace

    model = copy.copy(tiny_model)
    model.cfg = replace(tiny_model.cfg, max_utterance_s=3.0)
    assert Session("s", SessionConfig(), model).config.vad.max_utterance_s == 3.0
    assert Session("s", SessionConfig(vad=VadOptions(max_utterance_s=2.0)), model).config.vad.max_utterance_s == 2.0
    assert Session("s", SessionConfig(), tiny_model).config.vad.max_utterance_s == 25.0  # no limit: the client's
    s = Session("s", SessionConfig(interim_results=False, tasks=()), model)
    events = _stream(s, model, np.concatenate([SIL, male_clip, male_clip, SIL]))
    lengths = [e.end - e.start for e in events if isinstance(e, Final)]
    assert len(lengths) >= 3 and max(lengths) <= 3.0 + 0.04  # within a VAD frame of the cap
    assert s.snapshot().config["vad"]["max_utterance_s"] == 3.0  # a resumed session keeps it


def test_a_busy_worker_spaces_partials_out(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """``next_work(partial_spacing=k)`` (the engine's: the worker's load over its target)
    stretches the step between partials k times; below 1 it has no effect."""

    def steps(spacing: float) -> list[int]:
        s = Session("s", SessionConfig(max_partial_tokens=2, tasks=(), eager_final_ms=0), tiny_model)
        sizes: list[int] = []
        _stream(s, tiny_model, np.concatenate([SIL, male_clip, SIL]), chunk=1600, end=False,
                on_partial=lambda req: sizes.append(req.audio.size), spacing=spacing)  # fmt: skip
        return list(np.diff(sizes))

    assert steps(1.0) == steps(0.5) and set(steps(1.0)) == {8000}  # 480 ms, in 50 ms feeds
    assert steps(2.0) and set(steps(2.0)) == {16000}  # 960 ms, in 50 ms feeds
