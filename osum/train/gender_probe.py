"""Is gender in osum-mini's encoder outputs? A linear probe, trained and chosen on training data only.

    python -m osum.train.gender_probe [--per-speaker 20]

osum-mini's SGC answer (the LLM's closed-set tag) has stayed at chance on held-out real
speakers. This diagnostic asks whether the information is there at all: a logistic
regression on each utterance's pooled frozen Whisper-base outputs (mean and standard
deviation over frames: 1,024 numbers), trained on the training items' gender labels (the
cached features of ``osum.train.features``: TTS voices and the one real Asterisk speaker).

The L2 strength is chosen by leave-one-speaker-out accuracy over the *training* speakers
(macro over speakers), never by the test speakers; the held-out speakers of
:func:`osum.train.evaluate.gender_sets` are then scored once with the chosen strength. The
table prints every strength's held-out figure as well, marked, so that nobody has to take
the choice on trust. Nothing here is served: it is a measurement of the features.

``--codec2-males`` adds to the training side the only real male voices offline that the test
set does not hold (:data:`CODEC2_MALES`), cut into windows of at most 8 s: the training data's
one real voice is female, and the held-out male it misses (it_IT Carlo) is real.

``--pitch-variants`` (with ``--codec2-males``) adds those windows again with their median F0
moved to each of :data:`PITCH_MEDIANS` ``["male"]``, and 60 of the real female training
speaker's prompts moved to each of ``["female"]``, formants kept (:func:`pitch_variant`): the
held-out male the probe misses speaks near 178 Hz, where the training side has women only, so
the question is whether the probe then judges by the vocal tract rather than by pitch. Each
variant keeps its speaker's name: leaving a speaker out of the CV leaves out its variants.

``--layers N`` probes every encoder layer's output instead (N items of each training
speaker, encoded anew from the data's audio), to ask whether an earlier layer carries
gender better than the last; the choice is still by training-speaker CV.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import MAX_FILE_SECONDS, SAMPLE_RATE, load_audio, log_mel
from ..loading import cache_dir
from .data import load_manifest
from .evaluate import gender_sets
from .features import check_source, load_encoder

__all__ = ["CODEC2_MALES", "PITCH_MEDIANS", "pool", "fit", "speaker_cv", "layer_pools", "codec2_males", "pitch_variant",
           "report", "main"]

STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)

# Median F0 (Hz) of the pitch-moved copies: men's spread over and past the held-out male's ~178 Hz
# (not aimed at it alone), women's over the range of men's voices.
PITCH_MEDIANS = {"male": (150.0, 180.0, 210.0), "female": (120.0, 150.0)}

# Debian codec2-examples' real male recordings (/usr/share/codec2/wav), 8 kHz: radio amateurs'
# transmissions and the codec's test phrases. Median F0 84-118 Hz in every 6 s window (a check
# of the label, not its source). Left out: morig and forig (held-out speakers of
# evaluate.gender_sets) and m2400 / f2400 (the same clips through the codec); all.wav (a
# concatenation of other clips); hts2a, wia_16kHz (F0 174-184 Hz, sex not known); david4 and
# vk2tpm_004 (no voiced frames: modem audio). Whether any two share a speaker is not known.
CODEC2_MALES = ("ve9qrp", "vk5qi", "hts1a", "mmt1", "big_dog", "cross")


def pool(h: torch.Tensor) -> torch.Tensor:
    """(T, D) encoder outputs -> (2 D,): mean and standard deviation over frames."""
    h = h.float()
    return torch.cat([h.mean(0), h.std(0)])


def fit(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted L2 logistic regression on standardised ``x`` (N, D); returns (w (D,), b (1,))."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    weight = weight / weight.sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
        loss = loss + strength * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[arg-type]
    return w.detach(), b.detach()


def _balanced(speakers: list[str]) -> torch.Tensor:
    count = Counter(speakers)  # each speaker weighs the same: one real speaker has 40 % of the items
    return torch.tensor([1.0 / count[s] for s in speakers])


def speaker_cv(x: torch.Tensor, y: torch.Tensor, speakers: list[str], strength: float) -> float:
    """Leave-one-speaker-out accuracy, averaged over speakers."""
    accs = []
    for s in sorted(set(speakers)):
        out = torch.tensor([t == s for t in speakers])
        keep = [t for t in speakers if t != s]
        w, b = fit(x[~out], y[~out], _balanced(keep), strength)
        accs.append(float((((x[out] @ w + b) > 0).float() == y[out]).float().mean()))
    return float(np.mean(accs))


def _encoded_pool(enc: torch.nn.Module, audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """One utterance through the encoder, pooled: (2 D,)."""
    return pool(enc(log_mel(audio)[None])[0][0])


def layer_pools(enc: torch.nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """One utterance's pooled outputs of every encoder layer, (n_layers, 2 D): each layer's
    output as the next layer reads it (the last one before the final layer norm)."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0][0])) for layer in enc.encoders]
    try:
        enc(log_mel(audio)[None])
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([pool(h) for h in outs])


def codec2_males(window_s: float = 8.0, root: Path = Path("/usr/share/codec2/wav")) -> list[tuple[str, torch.Tensor]]:
    """(speaker, 16 kHz samples) for each window of at most ``window_s`` of :data:`CODEC2_MALES`
    (a last window shorter than 2 s is dropped); empty where codec2-examples is not installed."""
    out: list[tuple[str, torch.Tensor]] = []
    n = int(window_s * SAMPLE_RATE)
    for name in CODEC2_MALES:
        f = root / f"{name}.wav"
        if not f.is_file():
            continue
        windows = torch.as_tensor(load_audio(f, max_seconds=MAX_FILE_SECONDS)).split(n)
        out += [(f"codec2-{name}", w) for w in windows if len(w) >= 2 * SAMPLE_RATE]
    return out


def pitch_variant(audio: torch.Tensor, median_hz: float) -> torch.Tensor:
    """16 kHz ``audio`` with its median F0 moved to ``median_hz`` and its spectral envelope
    (formants, the vocal tract's length) kept: Praat's "Change gender" (PSOLA; formant shift
    ratio 1, pitch range and duration unchanged), through praat-parselmouth (the ``train`` extra)."""
    import parselmouth
    from parselmouth.praat import call

    sound = parselmouth.Sound(audio.double().numpy(), sampling_frequency=SAMPLE_RATE)
    moved = call(sound, "Change gender", 60.0, 400.0, 1.0, median_hz, 1.0, 1.0)  # pitch floor, ceiling (Hz) ...
    return torch.from_numpy(moved.values[0]).float().clamp(-1.0, 1.0)  # PSOLA overshoots by a few samples


def _pitch_moved(data: Path, train: list[dict], windows: list[tuple[str, torch.Tensor]],
                 n_female: int = 60) -> list[tuple[str, str, torch.Tensor]]:  # fmt: skip
    """(speaker, gender, audio) of :data:`PITCH_MEDIANS`' copies: every codec2 male window, and
    ``n_female`` prompts (seeded, unaugmented, at most 8 s) of the real female speaker among the
    training items ``train`` (of the data directory ``data``)."""
    out = [(s, "male", pitch_variant(a, m)) for s, a in windows for m in PITCH_MEDIANS["male"]]
    real = [it for it in train if it["id"].startswith("real/") and it["gender"] == "female"
            and not it["augment"] and "sources" not in it and it["seconds"] <= 8.0]  # the recordings as they are  # fmt: skip
    for it in random.Random(0).sample(real, min(n_female, len(real))):
        a = torch.as_tensor(load_audio(data / it["audio"]))
        out += [(it["speaker"], "female", pitch_variant(a, m)) for m in PITCH_MEDIANS["female"]]
    return out


def _pooled_cache(root: Path, ids: set[str]) -> dict[str, torch.Tensor]:
    """Pooled cached outputs of ``ids``, read shard by shard from memory-mapped files (the
    whole cache is 3-4 GB of tensors; the pools are 4 KB an item)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("feats.*.pt")):
        shard = torch.load(f, weights_only=True, mmap=True)
        out |= {k: pool(v) for k, v in shard.items() if k in ids}
    return out


def report(name: str, x: torch.Tensor, y: torch.Tensor, speakers: list[str],
           held: dict[str, tuple[str, torch.Tensor]]) -> None:  # fmt: skip
    """Print each strength's training-speaker CV and held-out accuracy; mark the choice by CV."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    cv = {s: speaker_cv(x, y, speakers, s) for s in STRENGTHS}
    chosen = max(STRENGTHS, key=lambda s: (cv[s], s))  # ties: the stronger prior
    for s in STRENGTHS:
        w, b = fit(x, y, _balanced(speakers), s)
        per = {n: float(((((t - mu) / sd @ w + b) > 0) == (g == "male")).float().mean()) for n, (g, t) in held.items()}
        mark = "  <- chosen on training speakers" if s == chosen else ""
        print(f"{name:>8} {s:12g} {cv[s]:22.1%} {np.mean(list(per.values())):15.1%}  "
              + " ".join(f"{n} {a:.0%}" for n, a in per.items()) + mark, flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=cache_dir() / "train" / "data")
    ap.add_argument("--feats", type=Path, default=cache_dir() / "train" / "feats")
    ap.add_argument("--base", type=Path, default=cache_dir() / "osum-mini")
    ap.add_argument("--per-speaker", type=int, default=20, help="held-out clips per speaker (as evaluate's)")
    ap.add_argument("--layers", type=int, default=0, metavar="N",
                    help="probe every encoder layer instead, on N items of each training speaker read from the "
                         "data's audio (the cache holds the last layer only)")
    ap.add_argument("--codec2-males", action="store_true",
                    help="add codec2-examples' real male voices (CODEC2_MALES) to the training side")
    ap.add_argument("--pitch-variants", action="store_true",
                    help="with --codec2-males: also those windows and 60 real female prompts with their pitch moved "
                         "(PITCH_MEDIANS), formants kept")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.pitch_variants and not args.codec2_males:
        ap.error("--pitch-variants needs --codec2-males")
    torch.set_num_threads(args.threads)

    enc = load_encoder(args.base)
    if args.layers:
        rng = random.Random(0)
        by_speaker: dict[str, list[dict]] = {}
        for it in load_manifest(args.data, "train"):
            by_speaker.setdefault(it["speaker"], []).append(it)
        items = [it for s in sorted(by_speaker) for it in rng.sample(by_speaker[s], min(args.layers, len(by_speaker[s])))]
        with torch.inference_mode():
            x = torch.stack([layer_pools(enc, load_audio(args.data / f"{it['id']}.flac")) for it in items])
            held_x = {n: (g, torch.stack([layer_pools(enc, load_audio(f)) for f in files]))
                      for n, (g, files) in gender_sets(args.per_speaker).items()}  # fmt: skip
        inputs = {f"layer {k}": (x[:, k], {n: (g, t[:, k]) for n, (g, t) in held_x.items()}) for k in range(x.shape[1])}
    else:
        check_source(args.feats, args.data)
        train = load_manifest(args.data, "train")
        pools = _pooled_cache(args.feats, {it["id"] for it in train})
        items = [it for it in train if it["id"] in pools]
        x = [pools[it["id"]] for it in items]
        with torch.inference_mode():
            held = {n: (g, torch.stack([_encoded_pool(enc, load_audio(f)) for f in files]))
                    for n, (g, files) in gender_sets(args.per_speaker).items()}  # fmt: skip
            if args.codec2_males:
                extra = codec2_males()
                items += [{"speaker": s, "gender": "male"} for s, _ in extra]
                x += [_encoded_pool(enc, a) for _, a in extra]
                if args.pitch_variants:
                    moved = _pitch_moved(args.data, train, extra)
                    items += [{"speaker": s, "gender": g} for s, g, _ in moved]
                    x += [_encoded_pool(enc, a) for _, _, a in moved]
        inputs = {"final": (torch.stack(x), held)}
    y = torch.tensor([1.0 if it["gender"] == "male" else 0.0 for it in items])
    speakers = [it["speaker"] for it in items]
    males = {s for s, g in zip(speakers, y.tolist(), strict=True) if g}
    print(f"training: {len(items)} items, {len(set(speakers))} speakers ({len(males)} male)")
    print(f"{'features':>8} {'L2 strength':>12} {'CV, training speakers':>22} {'held-out macro':>15}  per held-out speaker")
    for name, (x, held) in inputs.items():
        report(name, x, y, speakers, held)


if __name__ == "__main__":
    main()
