"""Encoder work for live partials: re-encoding from the utterance start vs chunked encoding with a cache.

WhisperLive and Fun-ASR-Nano re-encode the whole utterance for every partial (every
0.5 s here); :meth:`osum.encoder.WhisperEncoder.forward_chunk` encodes each new 0.5 s
once, attending to cached keys/values. This script measures both in one run, on
random weights of the chosen size (cost does not depend on the weights), and prints
one table: wall seconds of encoder work per second of audio, the ratio, and the ratio
of multiply-accumulates counted analytically. A second table: N live sessions' 0.5 s
chunks, each 10 s into its stream, encoded one call per session vs in one batch
(:meth:`~osum.encoder.WhisperEncoder.forward_chunks`, as the engine's partials do).

    python load_tests/bench_encoder.py [--size osum-mini|osum] [--threads 2] [--streams 1,4,16]
"""

from __future__ import annotations

import argparse
import time

import torch

from osum.config import PRESETS, EncoderConfig
from osum.encoder import WhisperEncoder

STEP_S = 0.5  # partial step
FRAMES_PER_S = 100  # mel frames


def macs(cfg: EncoderConfig, n_q: int, n_k: int) -> float:
    """Multiply-accumulates of the transformer layers for n_q query frames over n_k keys (50 Hz)."""
    d, f = cfg.d_model, cfg.ffn_dim
    per_layer = n_q * (4 * d * d + 2 * d * f) + 2 * n_q * n_k * d
    return cfg.n_layers * per_layer


def reencode(enc: WhisperEncoder, mel: torch.Tensor) -> tuple[float, float]:
    step = int(STEP_S * FRAMES_PER_S)
    t0, work = time.perf_counter(), 0.0
    for end in range(step, mel.shape[2] + 1, step):
        enc(mel[:, :, :end])
        n = end // 2
        work += macs(enc.cfg, n, n)
    return time.perf_counter() - t0, work


def chunked(enc: WhisperEncoder, mel: torch.Tensor) -> tuple[float, float]:
    step = int(STEP_S * FRAMES_PER_S)
    chunk = step // 2  # encoder frames per 0.5 s
    cache = enc.init_cache(chunk)
    t0, work, done = time.perf_counter(), 0.0, 0
    for start in range(0, mel.shape[2], step):
        y, cache = enc.forward_chunk(mel[:, :, start : start + step], cache)
        if y.shape[1]:
            work += macs(enc.cfg, y.shape[1], done + y.shape[1])
            done += y.shape[1]
    y, cache = enc.forward_chunk(mel[:, :, :0], cache, final=True)
    work += macs(enc.cfg, y.shape[1], done + y.shape[1])
    return time.perf_counter() - t0, work


def sessions(enc: WhisperEncoder, n: int, device: str, history_s: float = 10.0, reps: int = 3) -> tuple[float, float]:
    """Seconds to encode the next 0.5 s of ``n`` streams ``history_s`` into their audio:
    (one call per stream, one batched call)."""
    step = int(STEP_S * FRAMES_PER_S)
    caches = []
    for _ in range(n):
        cache = enc.init_cache(step // 2)
        _, cache = enc.forward_chunk(torch.randn(1, 80, int(history_s * FRAMES_PER_S) + 2, device=device), cache)
        caches.append(cache)
    mels = [torch.randn(1, 80, step, device=device) for _ in range(n)]
    for m, c in zip(mels, caches):  # the one in-place append a cache allows: spent here, so both forms copy alike
        enc.forward_chunk(m, c)
    t_one = t_batch = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for m, c in zip(mels, caches):
            enc.forward_chunk(m, c)
        t_one = min(t_one, time.perf_counter() - t0)
        t0 = time.perf_counter()
        enc.forward_chunks(mels, caches, [False] * n)
        t_batch = min(t_batch, time.perf_counter() - t0)
    return t_one, t_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="osum-mini", choices=["osum-mini", "osum", "tiny"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", default="5,10,20,30")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", default="1,4,16", help="sessions encoded together (second table)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.size].encoder
    enc = WhisperEncoder(cfg).eval().to(args.device)
    print(f"encoder {args.size}: d={cfg.d_model} layers={cfg.n_layers}; partial every {STEP_S} s; "
          f"{args.threads} threads on {args.device}")  # fmt: skip
    print(f"{'audio s':>8} {'re-encode s/s':>14} {'chunked s/s':>12} {'time ratio':>11} {'MAC ratio':>10}")
    with torch.inference_mode():
        enc(torch.randn(1, 80, 200, device=args.device))  # warm-up
        for secs in (float(s) for s in args.seconds.split(",")):
            mel = torch.randn(1, 80, int(secs * FRAMES_PER_S), device=args.device)
            t_re, w_re = reencode(enc, mel)
            t_ch, w_ch = chunked(enc, mel)
            print(f"{secs:8.0f} {t_re / secs:14.4f} {t_ch / secs:12.4f} {t_re / t_ch:10.1f}x {w_re / w_ch:9.1f}x")
        print(f"\n{'sessions':>8} {'one by one ms':>14} {'batched ms':>11} {'speed-up':>9}  (next 0.5 s of each, 10 s in)")
        for n in (int(x) for x in args.streams.split(",")):
            t_one, t_batch = sessions(enc, n, args.device)
            print(f"{n:8d} {t_one * 1e3:14.1f} {t_batch * 1e3:11.1f} {t_one / t_batch:8.1f}x")


if __name__ == "__main__":
    main()
