"""Real training turns cut as the live service cuts them.

The service never gives the model a whole file: silero-vad (``streaming.vad.Endpointer``)
cuts the stream into utterances that start ``speech_pad_ms`` before the first speech frame,
end ``speech_pad_ms`` after the first silent one, end at 600 ms pauses, and split past the
card's ``max_utterance_s`` at the quietest recent frame. The held-out prompts read that way
(``python -m osum.train.evaluate --served``) score differently from the same prompts read
whole: short prompts lose words at their edges, long ones gain from the split. The real
training items (trimmed turns, whole files) never had those edges.

``python -m osum.train.vadcut DATA`` runs the service's endpointer over real training items
of the data set ``DATA`` and writes each utterance it finds as a new item (``real/vad/...``,
manifest ``manifest.vad.jsonl``, read by :func:`osum.train.data.load_manifest` with the rest):

* each training prompt (its words placed by ``real-words.json``, the aligner's times, so an
  utterance gets the words whose middle it holds), and
* spliced turns (:mod:`osum.train.splice`), set in 0.3-1 s of a line's floor on either side as
  a stream would have them; a splice is kept only when the endpointer finds it one utterance
  that holds all of its speech (its spans carry no word times).

An utterance whose normalised text would contain a held-out sentence is not written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE, load_audio, speech_bounds
from .export import MAX_UTTERANCE_S  # the service splits longer turns here

__all__ = ["utterances", "prompt_pieces", "splice_piece"]

_TAIL_S = 1.0  # silence after the audio, so that the last utterance ends on silence as in a stream


def utterances(audio: np.ndarray, max_utterance_s: float = MAX_UTTERANCE_S) -> list[np.ndarray]:
    """The utterances the service's endpointer (its default options but ``max_utterance_s``)
    cuts from a stream of ``audio`` (16 kHz) followed by silence, as their samples: the last
    may end up to ``speech_pad_ms`` into that silence, as it would live."""
    x, cuts = _cuts(audio, max_utterance_s)
    return [x[a:b] for a, b in cuts]


def _cuts(audio: np.ndarray, max_utterance_s: float = MAX_UTTERANCE_S) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The stream (``audio`` and :data:`_TAIL_S` of silence) and its utterances' (start, end) samples."""
    from streaming.vad import Endpointer, VadOptions

    ep = Endpointer(replace(VadOptions(), max_utterance_s=max_utterance_s))
    x = np.concatenate([audio.astype(np.float32), np.zeros(int(_TAIL_S * SAMPLE_RATE), np.float32)])
    out: list[tuple[int, int]] = []
    start = None
    for ev in ep.push(x) + ep.flush():
        if ev.kind == "start":
            start = ev.sample
        elif start is not None:
            out.append((start, ev.sample))
            start = None
    return x, out


def prompt_pieces(audio: np.ndarray, words: list[list]) -> list[tuple[np.ndarray, str]]:
    """A prompt's utterances as served, each with the aligned ``words`` (text, start s, end s)
    whose midpoint it holds; an utterance without words is dropped, and a prompt whose words
    do not all fall in some utterance gives nothing (its text could not be told apart)."""
    x, cuts = _cuts(audio)
    pieces: list[list[str]] = [[] for _ in cuts]
    for text, t0, t1 in words:
        mid = (t0 + t1) / 2 * SAMPLE_RATE
        k = next((i for i, (a, b) in enumerate(cuts) if a <= mid < b), None)
        if k is None:
            return []
        pieces[k].append(text)
    return [(x[a:b], " ".join(w)) for (a, b), w in zip(cuts, pieces) if w]


def splice_piece(item: dict, audio: np.ndarray) -> np.ndarray | None:
    """A splice's audio as the service would cut it from a stream (set in 0.3-1 s of a faint
    floor on either side, seeded by the item's id), or None when the endpointer does not
    find exactly one utterance holding all of its speech (within 50 ms)."""
    rng = np.random.default_rng(int(hashlib.sha1(f"vad/{item['id']}".encode()).hexdigest()[:8], 16))
    before, after = (int(rng.uniform(0.3, 1.0) * SAMPLE_RATE) for _ in range(2))
    floor = rng.standard_normal(before + after).astype(np.float32) * 1e-4
    x = np.concatenate([floor[:before], audio.astype(np.float32), floor[before:]])
    lo, hi = speech_bounds(audio)
    first, last = before + lo, before + hi
    stream, cuts = _cuts(x)
    slack = int(0.05 * SAMPLE_RATE)
    if len(cuts) != 1 or cuts[0][0] > first + slack or cuts[0][1] < last - slack:
        return None
    return stream[cuts[0][0] : cuts[0][1]]


def _items(data: Path, splices: range) -> Iterator[tuple[dict, np.ndarray]]:
    from .data import ASTERISK_DIR, held_out_texts, load_manifest, normalize, real_prompts
    from .splice import splice_audio

    held = held_out_texts(real_prompts())
    aligned = json.loads((data / "real-words.json").read_text())
    by_id = {it["id"]: it for it in load_manifest(data)}

    for name, entry in sorted(aligned.items()):
        item = by_id.get(f"real/{name}")
        if item is None or item["split"] != "train":
            continue
        for k, (x, text) in enumerate(prompt_pieces(load_audio(data / item["audio"]), entry["words"])):
            if not any(f" {h} " in f" {normalize(text)} " for h in held):
                yield {"id": f"real/vad/{name}/{k}", "text": text, "from": item["id"], "augment": ["vad"]}, x
    for i in splices:
        item = by_id.get(f"real/splice/{i:05d}")
        if item is None:
            continue
        full = dict(item, sources=[str(ASTERISK_DIR / s) for s in item["sources"]])  # the manifest's are relative
        x = splice_piece(item, splice_audio(full))
        if x is not None:
            meta = {"id": f"real/vad/splice/{i:05d}", "text": item["text"], "from": item["id"],
                    "augment": ["vad", "spliced"]}  # fmt: skip
            yield meta, x


def build(data: Path, splices: range) -> Path:
    """Add the served cuts of ``data``'s training prompts and of the splices numbered in
    ``splices`` to ``data`` (resumable: items already written are skipped); returns the manifest."""
    import soundfile as sf

    manifest = data / "manifest.vad.jsonl"
    done = {json.loads(line)["id"] for line in manifest.read_text().splitlines()} if manifest.exists() else set()
    n = 0
    with manifest.open("a") as m:
        for meta, audio in _items(data, splices):
            if meta["id"] in done:
                continue
            path = data / f"{meta['id']}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), audio, SAMPLE_RATE)
            row = meta | {"gender": "female", "speaker": "asterisk-allison", "split": "train",
                          "audio": f"{meta['id']}.flac", "seconds": round(audio.size / SAMPLE_RATE, 3)}  # fmt: skip
            m.write(json.dumps(row) + "\n")
            n += 1
    print(f"{n} new served cuts in {manifest}")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a data set built with --real-splices (it has real-words.json)")
    ap.add_argument("--splices", default="0:0", metavar="A:B", help="the splices numbered A to B-1 (default none)")
    args = ap.parse_args()
    a, b = (int(v) for v in args.splices.split(":"))
    build(args.data, range(a, b))


if __name__ == "__main__":
    main()
