"""Word error rate with Whisper's English normaliser (the same for osum-mini and its baseline)."""

from __future__ import annotations

from .data import normalize

__all__ = ["capped_wer", "edit_distance", "exact_count", "missed_words", "wer", "word_hits"]


def _table(ref: list[str], hyp: list[str]) -> list[list[int]]:
    """Levenshtein table: ``d[i][j]`` edits between ``ref[:i]`` and ``hyp[:j]``."""
    d = [list(range(len(hyp) + 1))]
    for i, r in enumerate(ref, 1):
        row = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            row[j] = min(d[i - 1][j] + 1, row[j - 1] + 1, d[i - 1][j - 1] + (r != h))
        d.append(row)
    return d


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    return _table(ref, hyp)[-1][-1]


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


def word_hits(ref: list[str], hyp: list[str]) -> list[bool]:
    """For each word of ``ref``: whether a minimum-edit alignment with ``hyp`` keeps it
    (matched, not substituted or deleted). Ties go to a match, then a substitution."""
    d = _table(ref, hyp)
    hits, i, j = [False] * len(ref), len(ref), len(hyp)
    while i and j:
        if d[i][j] == d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            hits[i - 1] = ref[i - 1] == hyp[j - 1]
            i, j = i - 1, j - 1
        elif d[i][j] == d[i - 1][j] + 1:
            i -= 1  # a deletion: ref[i - 1] stays missed
        else:
            j -= 1
    return hits


def missed_words(refs: list[str], hyps: list[str], vocabulary: set[str]) -> dict[str, tuple[int, int]]:
    """Reference words substituted or deleted (insertions are not counted: they belong to
    no reference word), split by whether the word is in ``vocabulary`` (normalised):
    ``{"in": (missed, words), "out": (missed, words)}``."""
    out = {"in": [0, 0], "out": [0, 0]}
    for r, h in zip(refs, hyps, strict=True):
        rw = normalize(r).split()
        for w, hit in zip(rw, word_hits(rw, normalize(h).split()), strict=True):
            side = out["in" if w in vocabulary else "out"]
            side[0] += not hit
            side[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}
