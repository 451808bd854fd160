"""Word error rate with Whisper's English normaliser (the same for osum-mini and its baseline)."""

from __future__ import annotations

from .data import normalize

__all__ = ["capped_wer", "edit_distance", "exact_count", "wer"]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: total word edits / total reference words, after normalisation."""
    errors = words = 0
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = normalize(r).split(), normalize(h).split()
        errors += edit_distance(rw, hw)
        words += len(rw)
    return errors / max(words, 1)


def capped_wer(refs: list[str], hyps: list[str]) -> float:
    """Mean per-utterance WER, each capped at 100 %: one runaway hypothesis (hundreds of
    inserted words) cannot dominate it as it dominates the corpus WER of a weak model."""
    per = [min(1.0, wer([r], [h])) for r, h in zip(refs, hyps, strict=True)]
    return sum(per) / max(len(per), 1)


def exact_count(refs: list[str], hyps: list[str]) -> int:
    """Utterances transcribed without a word error (after normalisation)."""
    return sum(wer([r], [h]) == 0.0 for r, h in zip(refs, hyps, strict=True))
