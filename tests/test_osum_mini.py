"""osum-mini with its shipped weights (osum/weights/) on held-out real speech.

The first run installs and converts the base (see test_osum_mini_base.py). The WER bound
guards the shipped weights against regressions; it is not issue 3's target (at most 1.25 x
Whisper base's WER), which the shipped weights do not meet yet: their measured figures on all
100 held-out prompts are in their card (osum/weights/osum-mini.json) and docs/osum-mini.md.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from osum.audio import load_audio
from osum.decoding import DecodingOptions
from osum.errors import UnsupportedTaskError
from osum.inference import recognize
from osum.loading import MINI_OVERLAY
from osum.train.data import is_test, real_prompts
from osum.train.metrics import wer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/share/asterisk/sounds/en").is_dir(), reason="Asterisk's English prompts not installed"),
]
CACHE = Path(os.environ.get("OSUM_TEST_CACHE", Path.home() / ".cache" / "osum"))
N_CLIPS = 12
# Per clip, WER capped at 100 % and averaged, so that one runaway hypothesis (the interim
# weights loop on some long menu prompts) cannot decide the test alone. On these 12 clips the
# shipped weights scored 15.2 %, 4 clips exact (run mini-joint3, step 700, int8, 2026-12-02, and
# again mini-joint-ema2, step 300, 2026-12-04; mini-joint-splice2, step 300, 2026-12-06: 6.6 %,
# 5 exact; the weights of 2026-11-25 scored 42.9 %, 1 clip
# exact; such figures move by several points with numerically tiny changes to the int8
# arithmetic at this stage of training, docs/osum-mini.md); Whisper base scores 3.8 % WER.
# Broken weights or loading score near 100 %; the bound (0.55 until 2026-12-04) leaves twice
# the shipped figure's room.
CAPPED_WER_BOUND = 0.35


@pytest.fixture(scope="module")
def mini():  # type: ignore[no-untyped-def]
    from osum.loading import load_base_with_overlay
    from osum.prepare import prepare_osum_mini

    base = prepare_osum_mini(CACHE, install=True)
    return load_base_with_overlay(base, MINI_OVERLAY, quantize=True)  # as `osum-serve` runs it on CPU


@pytest.fixture(scope="module")
def held_out() -> list[tuple[np.ndarray, str]]:
    clips = [p for p in real_prompts() if is_test(p)][:N_CLIPS]
    return [(load_audio(p.path), p.text) for p in clips]


def test_shipped_weights_transcribe_held_out_real_speech(mini, held_out) -> None:  # type: ignore[no-untyped-def]
    hyps = [recognize(mini, [a], "asr", DecodingOptions(max_new_tokens=120), score_tags=False)[0].transcript or "" for a, _ in held_out]
    per_clip = [min(1.0, wer([t], [h])) for (_, t), h in zip(held_out, hyps)]
    score = sum(per_clip) / len(per_clip)
    print(f"capped per-clip WER {score:.1%}, exact {per_clip.count(0.0)} of {len(per_clip)}")
    assert score <= CAPPED_WER_BOUND, f"{score:.1%} on {N_CLIPS} held-out clips: {list(zip(hyps, [t for _, t in held_out]))}"
    assert per_clip.count(0.0) >= 1


def test_shipped_weights_claim_only_what_was_measured(mini, held_out) -> None:  # type: ignore[no-untyped-def]
    """The card serves transcription only: gender was measured at chance on held-out speakers,
    and emotion, style, events, age and chat have no honest data here."""
    assert mini.card is not None and mini.card["measured"] is not None
    assert mini.cfg.supported_tasks == tuple(mini.card["supported_tasks"])
    # its WER grows with utterance length (docs/osum-mini.md): the engine splits turns past 8 s
    assert mini.cfg.max_utterance_s == mini.card["max_utterance_s"] == 8.0
    if mini.card["measured"]["gender_macro"] < 0.95:
        assert "sgc" not in mini.cfg.supported_tasks
        with pytest.raises(UnsupportedTaskError):
            recognize(mini, [held_out[0][0]], "sgc")
    for task in ("ser", "ssr", "ved", "sap", "sttc"):
        with pytest.raises(UnsupportedTaskError):
            recognize(mini, [held_out[0][0]], task)
    # SRWT is not trained either: it is the transcript timed by the word aligner (measured below)
    srwt = recognize(mini, [held_out[0][0]], "srwt")[0]
    asr = recognize(mini, [held_out[0][0]], "asr", word_times=True)[0]
    assert srwt.transcript == asr.transcript and srwt.words == asr.words and len(srwt.words) == len(asr.transcript.split())


def test_streamed_finals_equal_offline_on_real_speech(mini, held_out) -> None:  # type: ignore[no-untyped-def]
    """Two held-out prompts streamed in 100 ms chunks with pauses: each Final equals offline
    recognition of its samples, partials only grow their committed text, and every tag the
    session asked for comes back unsupported rather than invented.

    On the int8 LLM, as served. A Final verifies a draft in one pass where offline decodes one
    token a call; "osum_rows" attention (osum.attention) makes the two agree bit for bit. They
    once differed in attention's last bits, which int8 rounding turned into other words."""
    from streaming.events import Analysis, Final, Partial
    from streaming.session import Session
    from streaming.session_base import SessionConfig
    from streaming.work import AnalysisRequest, FinalRequest, PartialRequest, run_analyses, run_finals, run_partials

    sil = np.zeros(16000, np.float32)
    pair = held_out[6:8]  # two short prompts
    x = np.concatenate([sil, pair[0][0], sil, sil, pair[1][0], sil])
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    heard = pcm.astype(np.float32) / 32768.0
    s = Session("s", SessionConfig(tasks=("emotion", "style", "events", "gender"), word_times=True), mini)
    events = []

    def pump() -> None:
        while (req := s.next_work()) is not None:
            if isinstance(req, PartialRequest):
                res = run_partials(mini, [req])[0]
            elif isinstance(req, FinalRequest):
                res = run_finals(mini, [req])[0]
            else:
                assert isinstance(req, AnalysisRequest)
                res = run_analyses(mini, [req])[0]
            s.apply(req, res)
        events.extend(s.drain())

    raw = pcm.tobytes()
    for i in range(0, len(raw), 3200):
        s.feed(raw[i : i + 3200])
        pump()
    s.end_of_stream()
    pump()

    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 2
    for f in finals:
        seg = heard[round(f.start * 16000) : round(f.end * 16000)]
        offline = recognize(mini, [seg], "asr", score_tags=False, word_times=True)[0]
        assert f.transcript == offline.transcript
        # the same word times, from the stream's start instead of the segment's
        assert [w.text for w in f.words] == f.transcript.split() == [w.text for w in offline.words]
        got, want = [(w.start, w.end) for w in f.words], [(f.start + w.start, f.start + w.end) for w in offline.words]
        assert np.allclose(got, want, atol=2e-3)
        assert all(f.start <= w.start < w.end <= f.end for w in f.words)
    assert wer([t for _, t in pair], [f.transcript for f in finals]) <= 0.5
    partials = [e for e in events if isinstance(e, Partial)]
    assert partials
    for uid in (0, 1):
        mine = [p for p in partials if p.utterance_id == uid]
        assert all(b.committed.startswith(a.committed) for a, b in itertools.pairwise(mine))
    for a in (e for e in events if isinstance(e, Analysis)):
        assert {k: v.label for k, v in a.tags.items()} == dict.fromkeys(("emotion", "style", "events", "gender"), "unsupported")


def test_osum_serve_runs_osum_mini_by_default(held_out) -> None:  # type: ignore[no-untyped-def]
    """The main job as a user starts it, with no --model: the default osum-mini (prepared on first
    start, already prepared here) transcribes a held-out prompt over /v1/listen, says in its log
    which trained weights it serves, and answers a tag it cannot honestly give with "unsupported"."""
    import asyncio
    import json
    import signal

    from .serving import start_serve, stream_listen

    proc, info = start_serve([], {"OSUM_HOME": str(CACHE)})
    try:
        audio, text = held_out[6]
        sil = np.zeros(16000, np.float32)
        url = f"ws://127.0.0.1:{info['ws_port']}"
        msgs = asyncio.run(asyncio.wait_for(stream_listen(url, np.concatenate([sil, audio, sil]), "tasks=emotion&words=true"), 120))
        finals = [m for m in msgs if m["type"] == "Results" and m["is_final"]]
        assert len(finals) == 1 and wer([text], [finals[0]["transcript"]]) <= 0.5, msgs
        words = finals[0]["words"]
        assert [w["word"] for w in words] == finals[0]["transcript"].split()
        assert all(finals[0]["start"] <= w["start"] < w["end"] <= finals[0]["end"] for w in words)
        # the SDK over gRPC (enable_word_time_offsets), the same samples: the same transcript and word times
        from osum_client import AsyncClient, StreamOptions, from_array
        from osum_client.events import Final

        from .serving import pcm16

        same = np.frombuffer(pcm16(np.concatenate([sil, audio, sil])), "<i2")  # as stream_listen sent them

        async def sdk() -> list:
            opt = StreamOptions(tasks=(), realtime=False, words=True)
            return [ev async for ev in AsyncClient(f"grpc://127.0.0.1:{info['grpc_port']}").stream(from_array(same), opt)]

        grpc_final = [e for e in asyncio.run(asyncio.wait_for(sdk(), 120)) if isinstance(e, Final)]
        assert len(grpc_final) == 1 and grpc_final[0].transcript == finals[0]["transcript"]
        assert np.allclose([(w.start, w.end) for w in grpc_final[0].words], [(w["start"], w["end"]) for w in words], atol=2e-3)
        analysis = [m for m in msgs if m["type"] == "Analysis"]
        assert analysis and analysis[0]["tags"]["emotion"]["label"] == "unsupported"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # reads and closes both pipes
    logs = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    from osum.loading import MINI_OVERLAY, read_card

    run = read_card(MINI_OVERLAY)["source"]["run"]  # type: ignore[index]
    assert any(f"trained weights: run {run}" in entry.get("msg", "") for entry in logs), logs


def test_word_times_on_speech_whose_word_boundaries_are_known(mini) -> None:  # type: ignore[no-untyped-def]
    """The word aligner (osum.timing) against reference word spans: four held-out prompt texts
    spoken by piper, whose phoneme alignments give each word's span (tests/data/piper_words.json;
    no real speech here has reference times). The aligner alone, given the reference text.
    On all 40 x 10 held-out conditions of `python -m osum.train.eval_words` the median error of
    a word's start was 60 ms and 95 % were within 200 ms (docs/osum-mini.md); these four
    clips are of its easiest condition (piper at its normal rate, clean)."""
    import json

    import torch

    from osum.audio import log_mel

    data = Path(__file__).parent / "data"
    clips = json.loads((data / "piper_words.json").read_text())["clips"]
    errors = []
    for clip in clips:
        audio = load_audio(data / clip["audio"])
        with torch.inference_mode():
            _, _, states = mini.encode_each_with_states([log_mel(audio)])
        words = mini.aligner.align(states[0], clip["text"])
        assert [w.text for w in words] == [w for w, _, _ in clip["words"]]
        errors += [(w.start - a, w.end - b) for w, (_, a, b) in zip(words, clip["words"])]
    e = np.abs(np.array(errors))
    assert len(e) == 28
    assert np.median(e, axis=0).max() <= 0.1, e
    assert (e <= 0.2).mean(axis=0).min() >= 0.85, e


def test_a_recording_past_the_window_is_cut_and_transcribed(mini, held_out) -> None:  # type: ignore[no-untyped-def]
    """A 30+ s recording of held-out prompts (1 s apart), as `osum transcribe` reads it: the
    service's VAD cuts it, the model reads each piece, and the joined text scores as the clips
    do one by one."""
    from streaming.longform import transcribe_recording

    gap = np.zeros(16000, np.float32)
    pieces, texts = [gap], []
    for audio, text in held_out:
        pieces += [audio, gap]
        texts.append(text)
        if sum(p.size for p in pieces) > 31 * 16000:
            break
    recording = np.concatenate(pieces)
    assert recording.size > 30 * 16000
    segments = transcribe_recording(mini, recording)
    assert len(segments) >= len(texts) and all(a.final.end <= b.final.start for a, b in zip(segments, segments[1:]))
    hyp = " ".join(s.final.transcript for s in segments)
    assert wer([" ".join(texts)], [hyp]) <= 0.5, (hyp, texts)  # as the streamed tests above
