"""Transcripts of long turns: held-out real prompts joined into one continuous turn each,
streamed through the engine's session, against Whisper base on the same turns.

osum-mini was trained on single prompts (most under 6 s), and its WER grows with the
length of what it is given at once; its card's ``max_utterance_s`` makes the engine split
longer turns at a quiet point, as it splits any turn at ``max_utterance_s``. This script
measures both: for each turn length, the WER of

* offline: the whole turn given to the model at once (``recognize``);
* streamed, split at the model's limit: the Finals of a session on the model as loaded;
* streamed, not split: the same with the limit lifted (the client's 25 s);
* Whisper base on the whole turn (its own 30 s window; the reference system).

The prompts are the held-out test split (never trained on), trimmed of their leading and
trailing silence and joined with 150 ms gaps (shorter than any endpoint), so a turn ends
only where the script ends it. Sessions are driven directly, as fast as the model runs
(this measures accuracy, not latency: bench_engine.py does that).

    python load_tests/long_turns.py --turns 12 --lengths 0,8,12,16
"""

from __future__ import annotations

import argparse
import copy
import random
from dataclasses import replace

import numpy as np
import torch

from osum.audio import load_audio, trim_silence
from osum.decoding import DecodingOptions
from osum.errors import AudioTooLongError
from osum.inference import recognize
from osum.train.data import is_test, real_prompts
from osum.train.metrics import wer
from streaming.longform import transcribe_recording

from bench_engine import load  # the same folder: run as a script


def turns(length_s: float, count: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``count`` turns of at least ``length_s`` (0: single prompts), each (audio, reference)."""
    prompts = []
    for p in (p for p in real_prompts() if is_test(p)):
        try:
            audio = trim_silence(load_audio(p.path))
        except AudioTooLongError:
            continue
        if audio.size < 8 * 16000:
            prompts.append((audio, p.text))
    random.Random(seed).shuffle(prompts)
    gap = np.zeros(2400, np.float32)
    out, i = [], 0
    while len(out) < count and i < len(prompts):
        parts, texts = [], []
        while (not parts or sum(x.size for x in parts) < length_s * 16000) and i < len(prompts):
            parts += [prompts[i][0], gap]
            texts.append(prompts[i][1])
            i += 1
        audio = np.concatenate(parts[:-1])
        if audio.size <= 24 * 16000:  # within the engine's longest utterance
            out.append((audio, " ".join(texts)))
    return out


def streamed(model: object, audio: np.ndarray) -> str:
    """The Finals' text of one session fed the turn (with a second of silence on each side)."""
    silence = np.zeros(16000, np.float32)
    return " ".join(seg.final.transcript for seg in transcribe_recording(model, np.concatenate([silence, audio, silence])))


def main() -> None:
    from osum.baseline import WhisperBaseline
    from osum.loading import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=12, help="turns per length")
    ap.add_argument("--lengths", default="0,8,12,16", help="turn lengths in seconds (0: single prompts)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load("osum-mini", quantize="int8")
    unsplit = copy.copy(model)
    unsplit.cfg = replace(model.cfg, max_utterance_s=None)  # the client's 25 s
    baseline = WhisperBaseline(cache_dir() / "osum-mini" / "whisper-base")
    limit = model.cfg.max_utterance_s
    print(f"osum-mini (LLM int8), held-out real prompts joined into turns; the card's max_utterance_s: {limit}")
    print(f"{'turn':>6} {'n':>3} {'mean s':>6} | {'offline, whole turn':>19} | {'streamed, split at limit':>24} | "
          f"{'streamed, unsplit':>17} | {'Whisper base':>12}")  # fmt: skip
    for length in (float(x) for x in args.lengths.split(",")):
        ts = turns(length, args.turns)
        refs = [t for _, t in ts]
        offline = [recognize(model, [a], "asr", DecodingOptions(max_new_tokens=200), score_tags=False)[0].transcript or ""
                   for a, _ in ts]  # fmt: skip
        split = [streamed(model, a) for a, _ in ts]
        whole = [streamed(unsplit, a) for a, _ in ts]
        base = [baseline.transcribe([a])[0] for a, _ in ts]
        mean_s = float(np.mean([a.size / 16000 for a, _ in ts]))
        name = "single" if length == 0 else f">={length:g} s"
        print(f"{name:>6} {len(ts):3d} {mean_s:6.1f} | {wer(refs, offline):19.1%} | {wer(refs, split):24.1%} | "
              f"{wer(refs, whole):17.1%} | {wer(refs, base):12.1%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
