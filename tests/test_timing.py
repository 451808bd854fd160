"""Word times from cross-attention (osum.timing): the DTW and the spans it gives, on matrices
whose answer is known. The aligner on real speech is tested in test_osum_mini.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from osum.errors import UnsupportedTaskError
from osum.inference import recognize
from osum.timing import FRAME_S, dtw, word_times
from streaming.engine import Engine
from streaming.session_base import SessionConfig


def _reference_dtw_cost(cost: np.ndarray) -> float:
    """The least total cost by the textbook double loop."""
    N, M = cost.shape
    D = np.full((N + 1, M + 1), np.inf)
    D[0, 0] = 0
    for i in range(1, N + 1):
        for j in range(1, M + 1):
            D[i, j] = cost[i - 1, j - 1] + min(D[i - 1, j - 1], D[i - 1, j], D[i, j - 1])
    return float(D[N, M])


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (5, 9), (12, 40), (30, 31)])
def test_dtw_finds_the_cheapest_monotonic_path(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    cost = rng.random(shape)
    rows, cols = dtw(cost)
    assert (rows[0], cols[0]) == (0, 0) and (rows[-1], cols[-1]) == (shape[0] - 1, shape[1] - 1)
    steps = np.stack([np.diff(rows), np.diff(cols)], 1)
    assert all(tuple(s) in {(1, 1), (1, 0), (0, 1)} for s in steps)  # connected and monotonic
    assert cost[rows, cols].sum() == pytest.approx(_reference_dtw_cost(cost))


def _attention(spans: list[tuple[int, int]], n_frames: int, heads: int = 3) -> torch.Tensor:
    """(heads, rows, frames) weights: row r looks at frames spans[r] (and a little noise)."""
    g = torch.Generator().manual_seed(0)
    att = torch.rand(heads, len(spans), n_frames, generator=g) * 0.05
    for r, (a, b) in enumerate(spans):
        att[:, r, a:b] += 1.0
    return att / att.sum(-1, keepdim=True)


def test_word_times_follow_the_attention() -> None:
    # rows predict: "Hel" "lo" "," "my" "world" "." and the end token (the path starts at frame 0)
    spans = [(0, 12), (12, 20), (20, 26), (26, 32), (32, 45), (45, 50), (50, 60)]
    got = word_times(_attention(spans, 60), [0, 0, -1, 1, 2, -1], 60)
    # "Hello" from its first token's first frame to its last token's last frame; the comma
    # (read in the pause) does not stretch it; "world" likewise without the full stop
    assert got[0] == pytest.approx((0, 20 * FRAME_S), abs=2 * FRAME_S)
    assert got[1] == pytest.approx((26 * FRAME_S, 32 * FRAME_S), abs=2 * FRAME_S)
    assert got[2] == pytest.approx((32 * FRAME_S, 45 * FRAME_S), abs=2 * FRAME_S)


def test_the_first_and_last_words_do_not_take_in_the_silence_around_them() -> None:
    # the path starts at frame 0: the first word's row looks at 2 s of silence before it, and
    # the last word's at 2 s after it (the end token's row then takes the last frames)
    middle = [(110 + 15 * k, 125 + 15 * k) for k in range(5)]  # five words of 0.3 s
    spans = [(0, 110), *middle, (185, 300), (300, 320)]
    got = word_times(_attention(spans, 320), list(range(7)), 320)
    longest = 2 * 0.3  # twice the median word
    assert got[0] == pytest.approx((110 * FRAME_S - longest, 110 * FRAME_S), abs=2 * FRAME_S)
    assert got[-1] == pytest.approx((185 * FRAME_S, 185 * FRAME_S + longest), abs=2 * FRAME_S)
    assert np.allclose(got[1:-1], np.array(middle) * FRAME_S, atol=2 * FRAME_S)


def test_word_times_are_ordered_within_the_audio_and_at_least_a_frame_long() -> None:
    spans = [(0, 3), (3, 4), (4, 5), (5, 20)]
    got = word_times(_attention(spans, 20), [0, 1, 2], 20, shifts=(0.09, 0.07))
    starts = [s for s, _ in got]
    assert starts == sorted(starts)
    assert all(e - s >= FRAME_S - 1e-9 and 0 <= s and e <= 20 * FRAME_S for s, e in got)
    assert got[0][0] == pytest.approx(0.09)  # the shift is applied
    # audio a little shorter than its frames (the encoder rounds up): nothing ends after it
    clipped = word_times(_attention(spans, 20), [0, 1, 2], 20, shifts=(0.09, 0.07), duration=0.39)
    assert all(s < e <= 0.39 for s, e in clipped)


def test_models_without_an_aligner_refuse_word_times(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """The tiny model's encoder is not Whisper's own, so it has no aligner: asking for word
    times is a clear unsupported_task, offline and when a session opens, not empty words."""
    assert tiny_model.aligner is None
    with pytest.raises(UnsupportedTaskError, match="word times"):
        recognize(tiny_model, [male_clip], "asr", word_times=True)

    async def main() -> None:
        engine = Engine(tiny_model)
        await engine.start()
        try:
            with pytest.raises(UnsupportedTaskError, match="word times"):
                await engine.open_session(SessionConfig(word_times=True))
            assert not engine.sessions
        finally:
            await engine.stop()

    asyncio.run(main())
