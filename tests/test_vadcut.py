"""Real training turns cut as the service cuts them (osum.train.vadcut)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from osum.train.vadcut import _cuts, prompt_pieces, splice_piece, utterances

ASTERISK = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
SR = 16000
needs_asterisk = pytest.mark.skipif(not ASTERISK.is_dir(), reason="asterisk-core-sounds-en-wav")


def _clip(name: str) -> np.ndarray:
    from osum.audio import load_audio

    return load_audio(ASTERISK / f"{name}.wav")


@needs_asterisk
def test_cuts_are_the_services_utterances(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The same (start, end) samples as the Finals of the live session's path, for a short
    prompt, two prompts a second apart, and a turn past ``max_utterance_s`` that it splits."""
    cfg = tiny_model.cfg
    # osum-mini's card; the session takes it from the model
    tiny_model.cfg = dataclasses.replace(cfg, max_utterance_s=8.0)
    try:
        _check_served(tiny_model)
    finally:
        tiny_model.cfg = cfg


def _check_served(model) -> None:  # type: ignore[no-untyped-def]
    from streaming.longform import transcribe_recording

    pair = np.concatenate([_clip("vm-goodbye"), np.zeros(SR, np.float32), _clip("conf-getpin")])
    long = _clip("conf-adminmenu")  # 19 s of menu, few long pauses
    for audio in (_clip("vm-goodbye"), pair, long):
        finals = [s.final for s in transcribe_recording(model, audio, max_new_tokens=4)]
        served = [(round(f.start * SR), round(f.end * SR)) for f in finals]
        _, cuts = _cuts(audio)
        assert cuts == served
    assert len(_cuts(pair)[1]) == 2 and len(_cuts(long)[1]) >= 3
    assert all(x.size <= 8 * SR for x in utterances(long))


@needs_asterisk
def test_a_prompts_words_go_with_the_utterance_that_holds_them() -> None:
    a, b = _clip("vm-goodbye"), _clip("conf-getpin")
    audio = np.concatenate([a, np.zeros(SR, np.float32), b])
    da, gap = a.size / SR, 1.0
    b0 = da + gap
    words = [["Goodbye!", 0.1, da - 0.1], ["Please", b0 + 0.1, b0 + 0.4], ["enter", b0 + 0.4, b0 + 0.7]]
    pieces = prompt_pieces(audio, words)
    assert [t for _, t in pieces] == ["Goodbye!", "Please enter"]
    x, cuts = _cuts(audio)
    assert [p.size for p, _ in pieces] == [e - s for s, e in cuts]
    # a word the endpointer did not hear (in the silence between): the prompt gives nothing
    assert prompt_pieces(audio, words + [["ghost", da + 0.4, da + 0.6]]) == []


@needs_asterisk
def test_a_splice_is_kept_only_as_one_utterance_holding_all_its_speech() -> None:
    from osum.audio import trim_silence

    speech = np.concatenate([trim_silence(_clip("vm-goodbye")), trim_silence(_clip("conf-getpin"))])
    piece = splice_piece({"id": "real/splice/00000"}, speech)
    assert piece is not None and speech.size <= piece.size <= speech.size + int(0.6 * SR)
    assert piece == pytest.approx(splice_piece({"id": "real/splice/00000"}, speech))  # seeded by the id
    # a pause the endpointer ends an utterance at: two utterances, so no item
    a, b = trim_silence(_clip("vm-goodbye")), trim_silence(_clip("conf-getpin"))
    paused = np.concatenate([a, np.zeros(SR, np.float32), b])
    assert splice_piece({"id": "real/splice/00001"}, paused) is None
