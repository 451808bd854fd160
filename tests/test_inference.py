"""Whole-model recognition and the command line, on the tiny model with real speech."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from osum.cli import SAMPLE_CLIP, main
from osum.decoding import DecodingOptions
from osum.errors import UnknownTaskError, UnsupportedTaskError
from osum.inference import recognize

SHORT = DecodingOptions(max_new_tokens=10)


def test_batch_equals_one_by_one(tiny_model, male_clip: np.ndarray, female_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    both = recognize(tiny_model, [male_clip, female_clip], "asr+age+gender", SHORT)
    for clip, r in zip([male_clip, female_clip], both):
        alone = recognize(tiny_model, [clip], "asr+age+gender", SHORT)[0]
        assert alone.tokens == r.tokens
        for a, b in zip(alone.tags, r.tags):
            assert a.scores is not None and b.scores is not None
            assert a.scores == pytest.approx(b.scores, abs=1e-3)


def test_every_tag_slot_gets_a_closed_set_distribution(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    r = recognize(tiny_model, [male_clip], "style+age+gender", SHORT)[0]
    assert [t.kind for t in r.tags] == ["style", "age", "gender"]
    for t in r.tags:
        assert t.scores is not None and sum(t.scores.values()) == pytest.approx(1.0, abs=1e-4)
    # the random model writes no valid tags: reported, not guessed
    assert r.problems and all(not t.valid for t in r.tags)
    assert r.truncated and r.duration == pytest.approx(4.0)


def test_unknown_and_unsupported_tasks(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownTaskError):
        recognize(tiny_model, [male_clip], "karaoke")
    limited = tiny_model
    original = limited.cfg
    try:
        limited.cfg = replace(original, supported_tasks=("asr",))
        with pytest.raises(UnsupportedTaskError, match="does not support task 'ser'"):
            recognize(limited, [male_clip], "ser", SHORT)
        assert recognize(limited, [male_clip], "asr", SHORT)[0].transcript is not None
    finally:
        limited.cfg = original


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["transcribe", str(SAMPLE_CLIP), "--model", "tiny", "--task", "emotion", "--json", "--max-new-tokens", "5"])
    out = json.loads(capsys.readouterr().out.strip())
    assert code == 0
    assert out["task"] == "ser" and out["model"] == "tiny" and len(out["tokens"]) == 5
    assert out["tags"][0]["kind"] == "emotion" and "scores" in out["tags"][0]


def test_cli_human_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    code = main(["transcribe", str(SAMPLE_CLIP), str(bad), "--model", "tiny", "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert code == 1  # one file failed, the other was still transcribed
    assert "transcript:" in captured.out and "error [invalid_audio_file]" in captured.err
    assert main(["transcribe", str(SAMPLE_CLIP), "--model", "tiny", "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["tasks"]) == 0 and "执行语音识别任务" in capsys.readouterr().out


def test_runaway_decoding_stops_at_the_audio_token_budget(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """The random tiny LLM never writes the end token: each row stops at its own budget for its
    duration (ASR: 6 tokens a second + 16), not at max_new_tokens, and is marked truncated."""
    from osum.tasks import get_task

    short, longer = male_clip[:16000], male_clip[:48000]
    res = recognize(tiny_model, [short, longer], "asr", DecodingOptions(max_new_tokens=400, loop_guard=False), score_tags=False)
    assert [len(r.tokens) for r in res] == [22, 34] and all(r.truncated for r in res)
    assert get_task("asr").token_budget(1.0) == 22 and get_task("sttc").token_budget(1.0) is None
    capped = recognize(tiny_model, [longer], "asr", DecodingOptions(max_new_tokens=30, loop_guard=False), score_tags=False)[0]
    assert len(capped.tokens) == 30  # max_new_tokens still applies when smaller


def test_loop_guard_cuts_a_looping_model(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """The random tiny LLM falls into a loop: unguarded it writes to its budget, guarded it stops
    where the loop completes and keeps one copy; the guarded output is a prefix of the unguarded."""
    from osum.decoding import loop_cut

    free = recognize(tiny_model, [male_clip[:48000]], "asr", DecodingOptions(loop_guard=False), score_tags=False)[0]
    guarded = recognize(tiny_model, [male_clip[:48000]], "asr", DecodingOptions(), score_tags=False)[0]
    assert loop_cut(free.tokens) is not None or any(loop_cut(free.tokens, e) for e in range(len(free.tokens)))
    assert len(guarded.tokens) < len(free.tokens) and guarded.truncated
    assert free.tokens[: len(guarded.tokens)] == guarded.tokens


def test_cli_cuts_a_long_recording_into_its_utterances(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      male_clip: np.ndarray, female_clip: np.ndarray) -> None:  # fmt: skip
    """Past the encoder's 30 s, `osum transcribe` runs the live session's VAD over the file:
    real speech, 10 utterances in 37 s, each found where it is (the tiny model's words are noise)."""
    import soundfile as sf

    gap = np.zeros(int(0.9 * 16000), np.float32)
    pieces, spans, t = [gap], [], gap.size / 16000
    for i in range(10):
        clip = male_clip if i % 2 == 0 else female_clip
        pieces += [clip, gap]
        spans.append((t, t + clip.size / 16000))
        t += (clip.size + gap.size) / 16000
    path = tmp_path / "call.wav"
    sf.write(path, np.concatenate(pieces), 16000)
    assert t > 30
    code = main(["transcribe", str(path), "--model", "tiny", "--json", "--max-new-tokens", "3"])
    out = json.loads(capsys.readouterr().out.strip())
    assert code == 0 and out["duration"] > 30 and len(out["segments"]) == 10, out
    for seg, (start, end) in zip(out["segments"], spans, strict=True):
        # the clips' own leading and trailing silence is up to ~0.35 s
        assert start - 0.2 <= seg["start"] <= start + 0.5 and end - 0.5 <= seg["end"] <= end + 0.4, (seg, start, end)
    assert out["transcript"] == " ".join(s["transcript"] for s in out["segments"])
    # short files stay whole unless asked
    assert main(["transcribe", str(SAMPLE_CLIP), "--model", "tiny", "--segment", "--max-new-tokens", "3"]) == 0
    assert "1 utterance)" in capsys.readouterr().out
    # tags of each utterance, under the session's names for the task's kinds (VED's "event")
    assert main(["transcribe", str(SAMPLE_CLIP), "--model", "tiny", "--segment", "--task", "ved", "--json",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    (seg,) = json.loads(capsys.readouterr().out.strip())["segments"]
    assert list(seg["tags"]) == ["events"] and seg["tags"]["events"]["label"]


def test_cli_gives_no_transcript_for_a_file_without_speech(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           male_clip: np.ndarray) -> None:  # fmt: skip
    """A silent file is not read whole (the LLM would write something for it): like a stream, it
    has no utterances and an empty transcript. The same file with speech in it is read whole."""
    import soundfile as sf

    rng = np.random.default_rng(1)
    quiet = (rng.standard_normal(16000) * 1e-3).astype(np.float32)  # a second of faint room noise
    sf.write(tmp_path / "silence.wav", quiet, 16000)
    sf.write(tmp_path / "speech.wav", np.concatenate([quiet, male_clip]), 16000)
    assert main(["transcribe", str(tmp_path / "silence.wav"), "--model", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["transcript"] == "" and out["segments"] == [] and out["duration"] == 1.0, out
    assert main(["transcribe", str(tmp_path / "silence.wav"), "--model", "tiny"]) == 0
    assert "0 utterances)" in capsys.readouterr().out
    assert main(["transcribe", str(tmp_path / "speech.wav"), "--model", "tiny", "--json", "--max-new-tokens", "3"]) == 0
    whole = json.loads(capsys.readouterr().out.strip())
    assert "segments" not in whole and whole["transcript"], whole


def test_segmented_transcription_decodes_with_the_options_given(capsys: pytest.CaptureFixture[str], tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`--segment` with `--osum-decoding`: each utterance is what offline recognition of its
    segment gives with OSUM's settings, not the greedy default's transcript."""
    from osum.audio import load_audio

    def segments(*flags: str) -> list[dict]:
        assert main(["transcribe", str(SAMPLE_CLIP), "--model", "tiny", "--segment", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip())["segments"]

    (paper,) = segments("--osum-decoding")
    (greedy,) = segments("--max-new-tokens", "400")
    assert (paper["start"], paper["end"]) == (greedy["start"], greedy["end"])
    audio = load_audio(SAMPLE_CLIP)
    seg = audio[round(paper["start"] * 16000) : round(paper["end"] * 16000)]
    offline = recognize(tiny_model, [seg], "asr", DecodingOptions.osum_paper(), score_tags=False)[0]
    assert paper["transcript"] == offline.transcript
    assert paper["transcript"] != greedy["transcript"]


def test_transcribe_segments_clips_past_the_cards_max_utterance(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`osum transcribe` reads a clip whole up to the model card's ``max_utterance_s`` and cuts
    a longer one into utterances, as the service does; without a limit, only past 30 s."""
    from osum.cli import segmented

    clip, long = np.zeros(5 * 16000, np.float32), np.zeros(12 * 16000, np.float32)
    cfg = tiny_model.cfg
    assert cfg.max_utterance_s is None
    assert not segmented(tiny_model, long, False) and segmented(tiny_model, clip, True)
    assert segmented(tiny_model, np.zeros(31 * 16000, np.float32), False)
    try:
        tiny_model.cfg = replace(cfg, max_utterance_s=8.0)
        assert not segmented(tiny_model, clip, False) and segmented(tiny_model, long, False)
    finally:
        tiny_model.cfg = cfg
