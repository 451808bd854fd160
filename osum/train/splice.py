"""Spliced real turns: new word sequences cut from the real training prompts.

The joined turns of :func:`osum.train.data.real_variants` put whole prompts side by side, so
every sentence inside them is one the model has heard many times in that voice; a model that
has memorised those sentences can read them back from a few acoustic cues. Held-out prompts
are new sentences in the same voice, and the model's errors on them are fluent misreadings
("Parsing is to say to fail." for "Parking attempt failed."): it guesses from the prior more
than it reads. A splice is a turn of 2-5 *spans* of consecutive words (1-4 where the cuts
allow), each from a random training prompt, so its word sequence is new and only the audio
says what comes next.

Word times come from Whisper base's own decoder (:class:`osum.timing.WordAligner`, the
aligner the service uses for word times) over the frozen encoder's output of each training
prompt; a cut between two words goes at the quietest 10 ms within :data:`SEARCH_S` of the
midpoint of the gap the aligner sees, and only where that frame is quiet (no cut inside
running speech), and each span fades in and out over :data:`FADE_S`. ``python -m osum.train.data build --real-splices N`` aligns the prompts
once (``real-words.json`` in the data directory, ~2 min on 2 cores) and adds ``N`` splices.
A splice whose normalised text contains a held-out sentence is not made.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE, trim_silence

__all__ = ["align_prompts", "cut_points", "splices", "splice_audio"]

SEARCH_S = 0.08  # a cut may move this far from the gap's midpoint, to the quietest 10 ms
MIN_WORD_S = 0.1  # a cut this close after the last one is none
QUIET_DB = -30.0  # a cut's frame, against the prompt's loudest 10 ms
FADE_S = 0.005
MAX_SPAN_WORDS = 4


def cut_points(audio: np.ndarray, words: list[tuple[str, float, float]]) -> list[float | None]:
    """Seconds at which ``audio`` (16 kHz) may be cut between its aligned ``words`` (word,
    start, end): ``len(words) + 1`` points, the first 0 and the last the end of the audio.
    Each inner one is the quietest 10 ms frame within :data:`SEARCH_S` of the midpoint
    between one word's end and the next word's start, or None where that frame is not
    quiet (:data:`QUIET_DB` under the loudest frame: the words run into each other there,
    and the aligner's times, tens of ms off on short words, would cut into one of them) or
    less than :data:`MIN_WORD_S` after the cut before it."""
    duration = audio.size / SAMPLE_RATE
    hop = SAMPLE_RATE // 100
    n = audio.size // hop * hop
    loudest = float(np.sqrt((audio[:n].reshape(-1, hop) ** 2).mean(1)).max()) if n else 0.0
    quiet = loudest * 10 ** (QUIET_DB / 20)
    cuts: list[float | None] = [0.0]
    last = 0.0
    for (_, _, end), (_, start, _) in zip(words, words[1:]):
        mid = (end + start) / 2
        lo, hi = max(0, int((mid - SEARCH_S) * SAMPLE_RATE)), min(audio.size, int((mid + SEARCH_S) * SAMPLE_RATE))
        frames = [(float(np.sqrt(np.mean(audio[i : i + hop] ** 2))), i) for i in range(lo, hi - hop + 1, hop // 2)]
        if not frames or min(frames)[0] > quiet:
            cuts.append(None)
            continue
        at = round((min(frames)[1] + hop // 2) / SAMPLE_RATE, 3)
        if at < last + MIN_WORD_S:  # the aligner crowded two words together: no cut after the second
            cuts.append(None)
            continue
        cuts.append(last := at)
    cuts.append(round(duration, 3))
    return cuts


def align_prompts(prompts: list, base_dir: Path, out: Path, say=print) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """Word times and cut points of each prompt (``RealPrompt``s), kept in ``out`` (JSON:
    ``{name: {"words": [[word, start, end], ...], "cuts": [...]}}``); a re-run aligns only
    the prompts not yet there."""
    import torch

    from ..audio import log_mel
    from ..timing import WordAligner
    from .features import load_encoder
    from .voices import read_wav

    done: dict[str, dict] = json.loads(out.read_text()) if out.is_file() else {}
    todo = [p for p in prompts if p.name not in done]
    if not todo:
        return done
    aligner = WordAligner.load(base_dir / "whisper-base")
    if aligner is None:
        raise RuntimeError(f"{base_dir / 'whisper-base'} lists no alignment heads: run `osum prepare osum-mini` again")
    enc = load_encoder(base_dir)
    with torch.inference_mode():
        for k, p in enumerate(todo):
            x = read_wav(str(p.path))
            if x.size >= 30 * SAMPLE_RATE:  # past the encoder's window: not spliced
                done[p.name] = {"words": [], "cuts": []}
                continue
            h, _ = enc(log_mel(x)[None])
            n = min(h.shape[1], int(np.ceil(x.size / SAMPLE_RATE / 0.02)))  # real frames, not the 30 s pad
            words = aligner.align(h[0, :n], p.text, x.size / SAMPLE_RATE)
            spans = [(w.text, w.start, w.end) for w in words]
            done[p.name] = {"words": [list(s) for s in spans], "cuts": cut_points(x, spans)}
            if (k + 1) % 100 == 0 or k + 1 == len(todo):
                say(f"aligned {k + 1}/{len(todo)} prompts")
                out.write_text(json.dumps(done))
    return done


def splices(seed: int, n: int, prompts: list, aligned: dict[str, dict], held: set[str]) -> Iterator[dict]:
    """``n`` spliced turns (ids ``real/splice/NNNNN``) from the training ``prompts``.

    Each item's ``sources`` and ``spans`` (seconds, from the prompt file's first sample) say
    what to cut, ``gaps`` the silence between spans, ``speed`` the speed change; ``text`` is
    the spans' words as the transcripts write them. A draw whose normalised text contains a
    ``held`` (normalised, held-out) sentence is drawn again.
    """
    from .data import normalize

    usable = [p for p in prompts if len(aligned.get(p.name, {}).get("words", ())) > 0]
    if not usable:
        raise ValueError("no aligned training prompt to splice")
    rng = random.Random(seed + 3)
    made = 0
    while made < n:
        sources, spans, texts = [], [], []
        for p in rng.sample(usable, min(len(usable), rng.randint(2, 5))):
            words, cuts = aligned[p.name]["words"], aligned[p.name]["cuts"]
            valid = [k for k, c in enumerate(cuts) if c is not None]
            i = rng.choice(valid[:-1])
            ends = [k for k in valid if i < k <= i + MAX_SPAN_WORDS] or [next(k for k in valid if k > i)]
            j = rng.choice(ends)
            sources.append(str(p.path))
            spans.append([cuts[i], cuts[j]])
            texts.append(" ".join(w for w, _, _ in words[i:j]))
        text = " ".join(texts)
        norm = f" {normalize(text)} "
        if any(f" {h} " in norm for h in held):
            continue
        gaps = [0.0 if rng.random() < 0.3 else round(rng.uniform(0.05, 0.4), 2) for _ in spans[1:]]
        yield {"id": f"real/splice/{made:05d}", "sources": sources, "spans": spans, "gaps": gaps,
               "speed": rng.choice([0.9, 1.0, 1.0, 1.1]), "texts": texts, "text": text}  # fmt: skip
        made += 1


def splice_audio(item: dict) -> np.ndarray:
    """The audio of a :func:`splices` item: each span cut, trimmed of silence at its outer
    edges and faded over :data:`FADE_S`, with gaps of a faint dither (a line's floor)
    between spans, then the speed change."""
    import hashlib

    from ..audio import resample
    from .voices import read_wav

    dither = np.random.default_rng(int(hashlib.sha1(item["id"].encode()).hexdigest()[:8], 16))
    fade = int(FADE_S * SAMPLE_RATE)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    pieces = []
    for k, (src, (a, b)) in enumerate(zip(item["sources"], item["spans"])):
        x = read_wav(src)[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)]
        x = trim_silence(x).copy()
        if x.size > 2 * fade:
            x[:fade] *= ramp
            x[-fade:] *= ramp[::-1]
        if k:
            pieces.append(dither.standard_normal(int(item["gaps"][k - 1] * SAMPLE_RATE)).astype(np.float32) * 1e-4)
        pieces.append(x.astype(np.float32))
    audio = np.concatenate(pieces)
    return resample(audio, round(SAMPLE_RATE * item["speed"])) if item["speed"] != 1.0 else audio
