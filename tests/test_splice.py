"""Spliced real turns (osum.train.splice): cuts only in quiet gaps, text with its audio, no held-out sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from osum.train.splice import MIN_WORD_S, cut_points, splice_audio, splices

ASTERISK = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
SR = 16000


def _speech(pattern: list[tuple[str, float]]) -> np.ndarray:
    """("s", seconds) of a loud tone or ("q", seconds) of near silence, in order."""
    t = np.arange(int(10 * SR)) / SR
    parts = [(0.3 * np.sin(2 * np.pi * 220 * t[: int(s * SR)]) if kind == "s" else 1e-4 * np.ones(int(s * SR)))
             for kind, s in pattern]  # fmt: skip
    return np.concatenate(parts).astype(np.float32)


def test_cuts_fall_in_quiet_gaps_and_never_inside_running_speech() -> None:
    # word a 0.1-0.4 s, gap to 0.6, word b 0.6-0.9, word c runs on from b with no gap, 0.9-1.2, gap, word d 1.4-1.7
    audio = _speech([("q", 0.1), ("s", 0.3), ("q", 0.2), ("s", 0.6), ("q", 0.2), ("s", 0.3), ("q", 0.1)])
    # aligner-like times, each boundary some tens of ms off
    words = [("a", 0.12, 0.43), ("b", 0.57, 0.88), ("c", 0.93, 1.18), ("d", 1.44, 1.7)]
    cuts = cut_points(audio, words)
    assert len(cuts) == len(words) + 1 and cuts[0] == 0.0 and cuts[-1] == pytest.approx(audio.size / SR)
    assert 0.4 <= cuts[1] <= 0.6 and 1.2 <= cuts[3] <= 1.4  # in the silences
    assert cuts[2] is None  # b and c run into each other: no cut between them
    # two boundaries the aligner crowds together: only the first is a cut
    crowded = [("a", 0.12, 0.45), ("b", 0.5, 0.52), ("c", 0.55, 1.2)]
    cuts = cut_points(_speech([("q", 0.1), ("s", 0.3), ("q", 0.2), ("s", 0.6), ("q", 0.1)]), crowded)
    assert cuts[1] is not None and cuts[2] is None
    assert all(b - a >= MIN_WORD_S for a, b in zip([c for c in cuts if c is not None], [c for c in cuts if c is not None][1:]))


@pytest.mark.skipif(not ASTERISK.is_dir(), reason="asterisk-core-sounds-en-wav")
def test_splices_cut_at_valid_points_keep_text_with_audio_and_avoid_held_out_sentences() -> None:
    from osum.audio import trim_silence
    from osum.train.data import normalize, training_prompts
    from osum.train.voices import read_wav

    prompts = [p for p in training_prompts() if 2 <= len(p.text.split()) <= 8][:30]
    aligned = {}
    for p in prompts:  # evenly spread word times stand in for the aligner's
        x = read_wav(str(p.path))
        words = p.text.split()
        step = x.size / SR / len(words)
        times = [(w, k * step, (k + 1) * step) for k, w in enumerate(words)]
        aligned[p.name] = {"words": [list(t) for t in times], "cuts": cut_points(x, times)}
    by_path = {str(p.path): p for p in prompts}
    items = list(splices(seed=1, n=40, prompts=prompts, aligned=aligned, held=set()))
    assert [it["id"] for it in items] == [f"real/splice/{k:05d}" for k in range(40)]
    assert items == list(splices(seed=1, n=40, prompts=prompts, aligned=aligned, held=set()))  # reproducible
    for it in items:
        assert 2 <= len(it["sources"]) <= 5 and len(it["gaps"]) == len(it["spans"]) - 1
        pieces = []
        for src, (a, b), text in zip(it["sources"], it["spans"], it["texts"], strict=True):
            entry = aligned[by_path[src].name]
            i, j = entry["cuts"].index(a), entry["cuts"].index(b)
            assert i < j and text == " ".join(w for w, _, _ in entry["words"][i:j])
            pieces.append(trim_silence(read_wav(src)[int(a * SR) : int(b * SR)]).size)
        assert it["text"] == " ".join(it["texts"])
        audio = splice_audio(it)
        expected = (sum(pieces) + sum(int(g * SR) for g in it["gaps"])) / it["speed"]
        assert abs(audio.size - expected) <= 2 and np.isfinite(audio).all()
    # a sentence the draws do make is never made once it is held out
    made = {normalize(t) for it in items for t in it["texts"] if len(t.split()) >= 2}
    held = sorted(made)[0]
    assert any(f" {held} " in f" {normalize(it['text'])} " for it in items)
    kept = list(splices(seed=1, n=40, prompts=prompts, aligned=aligned, held={held}))
    assert len(kept) == 40 and not any(f" {held} " in f" {normalize(it['text'])} " for it in kept)


@pytest.mark.skipif(not ASTERISK.is_dir(), reason="asterisk-core-sounds-en-wav")
def test_build_augments_only_the_splices_in_its_range_reproducibly(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import soundfile as sf

    from osum.train import data, voices

    prompts = [p for p in data.training_prompts() if 2 <= len(p.text.split()) <= 8][:12]
    aligned = {}
    for p in prompts:
        x = voices.read_wav(str(p.path))
        words = p.text.split()
        step = x.size / SR / len(words)
        times = [(w, k * step, (k + 1) * step) for k, w in enumerate(words)]
        aligned[p.name] = {"words": [list(t) for t in times], "cuts": cut_points(x, times)}
    items = list(splices(seed=1, n=5, prompts=prompts, aligned=aligned, held=set()))
    monkeypatch.setattr(data, "_items", lambda *a, **k: (dict(it) for it in items))
    for name in ("a", "b"):
        data.build(tmp_path / name, 0, seed=3, augment_splices=(1, 3))
    built = {it["id"]: it for it in data.load_manifest(tmp_path / "a")}
    assert sorted(built) == [it["id"] for it in items]
    for k, it in enumerate(items):
        got, _ = sf.read(str(tmp_path / "a" / built[it["id"]]["audio"]), dtype="float32")
        again, _ = sf.read(str(tmp_path / "b" / built[it["id"]]["audio"]), dtype="float32")
        assert np.array_equal(got, again)  # seeded by the data seed and the id
        raw = splice_audio(it)
        if k in (1, 2):
            assert "augmented" in built[it["id"]]["augment"]
            assert got.size != raw.size or np.abs(got - raw).max() > 1e-3
        else:
            assert built[it["id"]]["augment"] == [f"speed{it['speed']}", "spliced"]
            assert got.size == raw.size and np.abs(got - raw).max() < 1e-4  # FLAC's 16 bits
