"""osum-mini's training data: real recordings with a fixed held-out split, and synthetic speech.

The recipe (rebuild it with ``python -m osum.train.data build DIR``):

* **Real speech** (Debian ``asterisk-core-sounds-en-wav`` + ``asterisk-core-sounds-en``
  transcripts, CC-BY-SA-3.0): 568 IVR prompts by one female speaker, 8 kHz. Prompts of
  3+ words whose ``sha1(name) % 3 == 0`` form the **held-out test split**, never trained
  on; no training item, real or synthetic, may have a test transcript's normalised text.
  Other recordings of a test prompt's sentence are therefore left out of training (until
  2026-12-03 four were in it).
  Bracketed entries (tones, beeps) are dropped.
  ``--validation`` also sets apart a **validation split** (3+ words, ``sha1(name) % 6 == 1``,
  so never a test prompt; 52 prompts): not trained on either, under the same rule, and what a
  run's in-run evaluation reads with ``eval_split: "validation"``, so that steps and settings
  are chosen without the test prompts. It is clean only for a run that never trained on
  those prompts (one from the CTC stage on such data, not a continuation of weights that did).
* **Text** for synthesis: sentences of 3-20 words from Debian ``fortunes``, the training
  prompts' transcripts, and call-center / phone-menu sentences from templates with random
  numbers, amounts, dates, names and times (``TEMPLATES``; written for this project, not
  taken from the test set).
* **Voices** (:mod:`osum.train.voices`): piper ``en_US-joe-medium`` (male), flite ``slt``
  (female) and ``rms``, ``awb``, ``kal16`` (male), espeak-ng ``en-us`` variants ``m1``-``m7``
  (male) and ``f1``-``f5`` (female), with random rate and pitch. The gender label is the voice's.
* **Augmentation** (:mod:`osum.train.voices`): gain, additive white/pink noise at 5-35 dB SNR,
  a synthetic room reverberation, and the 8 kHz telephone band (with G.711 mu-law half of the time).
* **Real variants** (``--real-variants N``): each real training prompt at speeds 0.9 and 1.1
  (resampled: tempo and pitch, as Kaldi's speed perturbation), and ``N`` continuous turns of
  2-5 training prompts (trimmed, joined by 0.1-0.6 s gaps, some at 0.9 or 1.1 speed; a third
  or later prompt is left out where it would take the turn past ``MAX_JOINED_S``, so only a
  pair of long prompts runs longer): new word sequences in the real voice, and turns longer
  than one prompt. ``--edge-pad S`` gives each such turn 0 to S seconds of silence at each end
  (the joins are trimmed, while the endpointer's segments carry ~0.05-0.2 s of it).
  Only training prompts whose normalised text is no test prompt's are used.
* **Spliced turns** (``--real-splices N``, :mod:`osum.train.splice`): ``N`` turns of 2-5
  spans of a few consecutive words, each cut from a training prompt at a quiet point between
  words (Whisper base's word times), so that the word sequence is new to the model; none
  contains a held-out sentence.

Each item is a line of ``manifest.jsonl``: ``{"id", "audio", "text", "gender", "speaker",
"source", "split"}`` with 16 kHz FLAC audio beside it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE, resample, trim_silence
from .voices import VOICES, augment, read_wav, synthesize

__all__ = ["RealPrompt", "real_prompts", "is_test", "is_validation", "held_out", "normalize", "corpus", "real_variants",
           "build"]  # the voices and the augmentation: osum.train.voices

ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TEXT = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
FORTUNES_DIR = Path("/usr/share/games/fortunes")


@dataclass(frozen=True)
class RealPrompt:
    name: str  # e.g. "digits/5" or "vm-goodbye"
    path: Path
    text: str


def normalize(text: str) -> str:
    """Whisper's English normaliser (lowercase, no punctuation, numbers spelt consistently)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    global _NORMALIZER
    if _NORMALIZER is None:
        _NORMALIZER = EnglishTextNormalizer({})
    return _NORMALIZER(text)


_NORMALIZER = None


def real_prompts(root: Path = ASTERISK_DIR, transcripts: Path = ASTERISK_TEXT) -> list[RealPrompt]:
    """The Asterisk English prompts that have a spoken transcript and a file."""
    out = []
    with gzip.open(transcripts, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = (s.strip() for s in line.split(":", 1))
            if not text or "[" in text:
                continue
            path = root / f"{name}.wav"
            if path.is_file():
                out.append(RealPrompt(name, path, text))
    return out


def _name_hash(prompt: RealPrompt) -> int:
    return int(hashlib.sha1(prompt.name.encode()).hexdigest(), 16)


def is_test(prompt: RealPrompt) -> bool:
    """The fixed held-out split: 3+ words and sha1(name) % 3 == 0."""
    return len(prompt.text.split()) >= 3 and _name_hash(prompt) % 3 == 0


def is_validation(prompt: RealPrompt) -> bool:
    """The validation split (``build --validation``): 3+ words and sha1(name) % 6 == 1,
    hence never a test prompt (% 3 == 1)."""
    return len(prompt.text.split()) >= 3 and _name_hash(prompt) % 6 == 1


def held_out(prompt: RealPrompt, validation: bool = False) -> bool:
    """Not trained on: a test prompt, or (``validation``) a validation prompt."""
    return is_test(prompt) or (validation and is_validation(prompt))


def held_out_texts(prompts: list[RealPrompt], validation: bool = False) -> set[str]:
    """Normalised sentences of the held-out prompts (test, and validation if asked): nothing
    trained on may say one of them, whichever recording it comes from (Asterisk has several
    of some sentences)."""
    return {normalize(p.text) for p in prompts if held_out(p, validation)} - {""}


def _fortune_sentences() -> list[str]:
    out = []
    for f in sorted(FORTUNES_DIR.glob("*")):
        if f.suffix or f.is_dir():
            continue
        text = f.read_text(encoding="utf-8", errors="ignore")
        for cookie in text.split("\n%\n"):
            flat = " ".join(cookie.split())
            for s in re.split(r"(?<=[.!?])\s+", flat):
                words = s.split()
                if s.startswith("-") or "--" in s:  # attributions ("-- Mark Twain")
                    continue
                if 3 <= len(words) <= 20 and s.isascii() and re.fullmatch(r"[A-Za-z0-9 ,.'!?;:$%-]+", s):
                    out.append(s)
    return sorted(set(out))


_NAMES = ["James", "Maria", "Robert", "Linda", "Michael", "Patricia", "David", "Jennifer", "Daniel", "Susan",
          "Kevin", "Laura", "Brian", "Emily", "Carlos", "Aisha", "Wei", "Olga", "Samuel", "Grace"]  # fmt: skip
_THINGS = ["order", "account", "subscription", "invoice", "claim", "reservation", "ticket", "package", "refund", "appointment"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEMPLATES = [
    "Thank you for calling {company}. How can I help you today?",
    "Your {thing} number is {digits}.",
    "I would like to check the status of my {thing}.",
    "Your current balance is {amount} dollars.",
    "The payment of {amount} dollars was received on {month} {day}.",
    "To speak with {name}, press {digit}.",
    "For billing questions, press {digit}. For technical support, press {digit2}.",
    "Please hold while I transfer your call to the {dept} department.",
    "I am sorry, but that {thing} has already been cancelled.",
    "Can you confirm the last four digits of your card?",
    "Your appointment is on {weekday} at {hour} {ampm}.",
    "My name is {name} and I am calling about my {thing}.",
    "I have been waiting for {minutes} minutes and nobody has answered.",
    "The {thing} will be delivered within {n} business days.",
    "Please say or enter your {thing} number followed by the pound key.",
    "We are open {weekday} through {weekday2} from {hour} to {hour2}.",
    "Could you spell your last name for me, please?",
    "Is there anything else I can help you with today?",
    "I need to update the address on my {thing}.",
    "Your call may be recorded for quality and training purposes.",
    "The {dept} team will call you back within {n} hours.",
    "I was charged twice for the same {thing}.",
    "Press {digit} to repeat this menu.",
    "You have {n} new messages and {n2} saved messages.",
    "The reference number for this call is {digits}.",
]
_COMPANIES = ["Northwind", "Acme Bank", "Blue Sky Airlines", "City Water", "Green Energy", "Metro Telecom"]
_DEPTS = ["billing", "sales", "support", "claims", "returns", "accounts"]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        company=rng.choice(_COMPANIES), thing=rng.choice(_THINGS), name=rng.choice(_NAMES), dept=rng.choice(_DEPTS),
        digits=" ".join(str(rng.randrange(10)) for _ in range(rng.randint(4, 8))), digit=rng.randrange(1, 10),
        digit2=rng.randrange(0, 10), amount=f"{rng.randrange(1, 2000)}.{rng.randrange(100):02d}",
        month=rng.choice(_MONTHS), day=rng.randint(1, 28), weekday=rng.choice(_DAYS), weekday2=rng.choice(_DAYS),
        hour=rng.randint(1, 12), hour2=rng.randint(1, 12), ampm=rng.choice(["a.m.", "p.m."]),
        minutes=rng.randint(2, 90), n=rng.randint(1, 9), n2=rng.randint(0, 20),
    )  # fmt: skip


def corpus(seed: int, n_templates: int = 3000, validation: bool = False) -> list[str]:
    """Training sentences: fortunes + training prompts + filled templates; held-out texts removed."""
    rng = random.Random(seed)
    prompts = real_prompts()
    test = held_out_texts(prompts, validation)
    texts = _fortune_sentences() + [p.text for p in prompts if not held_out(p, validation)]
    texts += [_fill(rng.choice(TEMPLATES), rng) for _ in range(n_templates)]
    # an empty normalised text is a silence file's "(3 seconds of silence)": no sentence to speak
    return [t for t in dict.fromkeys(texts) if (n := normalize(t)) and n not in test]


# ---- building the set -----------------------------------------------------------------


def _existing(manifest: Path) -> set[str]:
    if not manifest.is_file():
        return set()
    return {json.loads(line)["id"] for line in manifest.read_text().splitlines() if line.strip()}


SPEEDS = (0.9, 1.1)
MAX_JOINED_S = 16.0


def real_variants(seed: int, n_joined: int, edge_pad: float = 0.0, validation: bool = False) -> Iterator[dict]:
    """Items derived from the real training prompts: each at :data:`SPEEDS`, and ``n_joined``
    turns of 2-5 prompts. ``sources``, ``gaps`` (seconds) and ``speed`` say how to build each.

    ``edge_pad`` > 0 gives each turn ``edges``: 0 to ``edge_pad`` seconds of a line's floor
    before and after its trimmed speech, as the endpointer hands the model a segment with
    some silence at each end. The draws come from their own generator, so the turns
    themselves are those of ``edge_pad`` 0. ``validation``: the validation prompts are held out too.
    """
    if edge_pad < 0:
        raise ValueError("edge_pad must be >= 0")
    train = training_prompts(validation)
    for p in train:
        for f in SPEEDS:
            yield {"id": f"real/speed{f}/{p.name}", "sources": [str(p.path)], "gaps": [], "speed": f,
                   "texts": [p.text], "text": p.text}  # fmt: skip
    rng, edges = random.Random(seed + 1), random.Random(seed + 2)
    for i in range(n_joined):
        parts = rng.sample(train, rng.randint(2, 5))
        item = {"id": f"real/join/{i:05d}", "sources": [str(p.path) for p in parts],
                "gaps": [round(rng.uniform(0.1, 0.6), 2) for _ in parts[1:]],
                "speed": rng.choice([0.9, 1.0, 1.0, 1.1]), "texts": [p.text for p in parts],
                "text": " ".join(p.text for p in parts)}  # fmt: skip
        if edge_pad > 0:
            item["edges"] = [round(edges.uniform(0, edge_pad), 2), round(edges.uniform(0, edge_pad), 2)]
        yield item


def _derived_audio(item: dict) -> np.ndarray:
    """The audio of a :func:`real_variants` item (which it updates in place): trimmed prompts,
    gaps of a faint dither (a line's floor), then the speed change. A join is cut before its
    third or later prompt where that would take it past :data:`MAX_JOINED_S`, the text with
    it; the first two prompts are always kept, so a pair may be longer. ``edges`` (seconds of
    the same floor before and after, outside that limit) are added last, before the speed."""
    joined = len(item["sources"]) > 1
    dither = np.random.default_rng(int(hashlib.sha1(item["id"].encode()).hexdigest()[:8], 16))
    pieces, n, kept = [], 0, 0
    for k, src in enumerate(item["sources"]):
        x = trim_silence(read_wav(src)) if joined else read_wav(src)
        gap = dither.standard_normal(int(item["gaps"][k - 1] * SAMPLE_RATE)).astype(np.float32) * 1e-4 if k else x[:0]
        if k >= 2 and (n + gap.size + x.size) / item["speed"] > MAX_JOINED_S * SAMPLE_RATE:
            break
        pieces += [gap, x]
        n += gap.size + x.size
        kept += 1
    item["sources"], item["gaps"], item["texts"] = item["sources"][:kept], item["gaps"][: kept - 1], item["texts"][:kept]
    item["text"] = " ".join(item["texts"])
    lead, trail = (int(e * SAMPLE_RATE) for e in item.get("edges", (0.0, 0.0)))
    floor = dither.standard_normal(lead + trail).astype(np.float32) * 1e-4
    audio = np.concatenate([floor[:lead], *pieces, floor[lead:]])
    return resample(audio, round(SAMPLE_RATE * item["speed"])) if item["speed"] != 1.0 else audio


def training_prompts(validation: bool = False) -> list[RealPrompt]:
    """The real prompts that may be trained on: not held out, and no held-out prompt's sentence."""
    prompts = real_prompts()
    held = held_out_texts(prompts, validation)
    return [p for p in prompts if not held_out(p, validation) and (n := normalize(p.text)) and n not in held]


def _items(seed: int, n_synth: int, n_joined: int = 0, edge_pad: float = 0.0,
           validation: bool = False, n_splices: int = 0, aligned: dict | None = None) -> Iterator[dict]:  # fmt: skip
    prompts = real_prompts()
    test, held = held_out_texts(prompts), held_out_texts(prompts, validation)
    for p in prompts:
        if is_test(p):
            split = "test"
        elif normalize(p.text) in test:
            continue  # another recording of a test prompt's sentence (e.g. conf-lockednow, confbridge-locked)
        elif validation and is_validation(p):
            split = "validation"
        elif normalize(p.text) in held:
            continue  # another recording of a validation prompt's sentence
        else:
            split = "train"
        yield {"id": f"real/{p.name}", "source": p.path, "text": p.text, "gender": "female",
               "speaker": "asterisk-allison", "split": split}  # fmt: skip
    if n_joined:
        for item in real_variants(seed, n_joined, edge_pad, validation):
            yield item | {"gender": "female", "speaker": "asterisk-allison", "split": "train"}
    if n_splices:
        from .splice import splices

        for item in splices(seed, n_splices, training_prompts(validation), aligned or {}, held):
            yield item | {"gender": "female", "speaker": "asterisk-allison", "split": "train"}
    texts = corpus(seed, validation=validation)
    rng = random.Random(seed)
    for i in range(n_synth):
        voice = rng.choice(sorted(VOICES))
        yield {"id": f"tts/{i:06d}", "text": rng.choice(texts), "voice": voice, "gender": VOICES[voice],
               "speaker": voice, "split": "train", "seed": rng.randrange(1 << 30)}  # fmt: skip


def build(out: Path, n_synth: int, seed: int = 0, shard: int = 0, n_shards: int = 1, n_joined: int = 0,
          edge_pad: float = 0.0, validation: bool = False, n_splices: int = 0, base: Path | None = None,
          augment_splices: tuple[int, int] | None = None) -> Path:  # fmt: skip
    """Write (or resume writing) the data set into ``out``; returns the manifest path.

    ``n_splices`` > 0 aligns the training prompts' words first (``out/real-words.json``,
    with the prepared osum-mini ``base``: Whisper base's encoder and decoder), see
    :mod:`osum.train.splice`. ``augment_splices`` ``(a, b)``: the splices numbered ``a`` to
    ``b - 1`` also get the synthetic recipe's :func:`augment` (gain, reverberation, noise,
    telephone band), seeded by the data seed and the item's id, so that each of the many
    splices reusing one recorded word hears it in another channel.

    Shards let several processes build in parallel (``shard`` of ``n_shards``), each with its
    own manifest file; :func:`load_manifest` reads them all.
    """
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / f"manifest.{shard}.jsonl"
    # every shard's items, not only this one's: a resumed build whose item order or shard count
    # changed (a recipe fix that drops items shifts which shard takes which) adds no duplicates
    done = set().union(*(_existing(m) for m in out.glob("manifest.*.jsonl")))
    aligned = None
    if n_splices:
        from ..loading import cache_dir
        from .splice import align_prompts

        aligned = align_prompts(training_prompts(validation), base or cache_dir() / "osum-mini", out / "real-words.json")
    with manifest.open("a") as m:
        for k, item in enumerate(_items(seed, n_synth, n_joined, edge_pad, validation, n_splices, aligned)):
            if k % n_shards != shard or item["id"] in done:
                continue
            path = out / f"{item['id']}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            if "source" in item:
                audio = read_wav(str(item.pop("source")))
                item["augment"] = []
            elif "spans" in item:
                from .splice import splice_audio

                audio = splice_audio(item)
                item["augment"] = [f"speed{item['speed']}", "spliced"]
                if augment_splices and augment_splices[0] <= int(item["id"].rsplit("/", 1)[1]) < augment_splices[1]:
                    audio, applied = augment(audio, random.Random(f"{seed}/{item['id']}"))
                    item["augment"] += ["augmented", *applied]
                item["sources"] = [str(Path(s).relative_to(ASTERISK_DIR)) for s in item["sources"]]
            elif "sources" in item:
                audio = _derived_audio(item)
                item["augment"] = [f"speed{item['speed']}"] + (["joined"] if len(item["sources"]) > 1 else [])
                item["sources"] = [str(Path(s).relative_to(ASTERISK_DIR)) for s in item["sources"]]
            else:
                rng = random.Random(item.pop("seed"))
                audio, item["augment"] = augment(synthesize(item["text"], item["voice"], rng), rng)
            if len(audio) < 1600 or len(audio) > 30 * SAMPLE_RATE:
                continue
            sf.write(str(path), audio, SAMPLE_RATE, format="FLAC")
            item |= {"audio": str(path.relative_to(out)), "seconds": round(len(audio) / SAMPLE_RATE, 3)}
            m.write(json.dumps(item) + "\n")
            m.flush()
    return manifest


def load_manifest(root: Path, split: str | None = None) -> list[dict]:
    items = []
    for f in sorted(root.glob("manifest.*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                if split is None or item["split"] == split:
                    items.append(item)
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description="build osum-mini's training data")
    ap.add_argument("command", choices=["build"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--synthetic", type=int, default=12000, help="number of synthetic utterances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--real-variants", type=int, default=0, metavar="N",
                    help="add the real training prompts at two speeds and N turns joined from them")
    ap.add_argument("--edge-pad", type=float, default=0.0, metavar="S",
                    help="give each joined turn 0 to S seconds of silence before and after (default 0)")
    ap.add_argument("--validation", action="store_true",
                    help="set apart a validation split of real prompts (~1 in 6 of 3+ words), never trained on, "
                         "for in-run evaluation")
    ap.add_argument("--real-splices", type=int, default=0, metavar="N",
                    help="add N turns spliced from spans of 1-4 words of the real training prompts (osum.train.splice)")
    ap.add_argument("--base", type=Path, help="the prepared osum-mini base, for --real-splices (default: the cache's)")
    ap.add_argument("--augment-splices", metavar="A:B",
                    help="augment the splices numbered A to B-1 as the synthetic speech is (gain, reverb, noise, "
                         "telephone band)")
    args = ap.parse_args()
    span = None
    if args.augment_splices:
        a, _, b = args.augment_splices.partition(":")
        span = (int(a), int(b)) if a.isdigit() and b.isdigit() else (0, 0)
        if not span[0] < span[1]:
            ap.error(f"--augment-splices wants A:B with 0 <= A < B, got {args.augment_splices!r}")
    print(build(args.out, args.synthetic, args.seed, args.shard, args.shards, args.real_variants, args.edge_pad,
                args.validation, args.real_splices, args.base, span))  # fmt: skip


if __name__ == "__main__":
    main()
