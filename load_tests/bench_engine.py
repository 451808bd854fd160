"""Latency of the streaming engine under N concurrent real-time streams of real speech.

Each stream plays real speech clips (CMU ARCTIC, and the Asterisk prompts when installed)
separated by 1.0-1.6 s pauses, in 100 ms chunks at real-time pace, into one engine
in this process (no network: the servers' overhead is measured by the load tests).
For every utterance it records, in wall time:

* first partial: from the speech's start in the audio to the first Partial;
* endpoint: from the end of speech (the true end of the clip) to SpeechEnded, the VAD's
  decision (the configured trailing silence plus the VAD's own lag);
* final: from the end of speech (the true end of the clip, not the VAD's decision, so
  the configured trailing silence is included) to the Final;
* analysis: from the Final to the Analysis (tags);
* an utterance split at ``max_utterance_s``: its first partial counts from the split, and
  its Final goes in a line of its own (from the split, which the VAD chooses up to
  ``split_search_ms`` back when the length is reached);
* partial lag: from the arrival of the audio a Partial covers up to its end, to that Partial;
* partial every: wall time between consecutive Partials of an utterance (how often the
  text is updated; it grows on long utterances with full-context partials' ``partial_growth``);

and prints P50/P95 per N, the worker's real-time factor (busy seconds per audio second)
and memory per session for a 30 s utterance.

    python load_tests/bench_engine.py --model tiny --streams 1,2,4 --seconds 20
    python load_tests/bench_engine.py --model osum-mini-random    # osum-mini sizes, random adapter (timing only)
    python load_tests/bench_engine.py --model osum-mini --quantize int8 --utterance-s 15   # long turns
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import numpy as np
import torch

from osum.audio import load_audio, trim_silence
from streaming.engine import Engine, EngineOptions
from streaming.events import Analysis, Final, Partial, SpeechEnded
from streaming.session_base import SessionConfig

CHUNK = 1600  # 100 ms


def clips() -> list[np.ndarray]:
    assets = Path(__file__).resolve().parent.parent / "osum" / "assets"
    out = [load_audio(assets / "arctic_a0007.wav"), load_audio(assets / "arctic_a0009.wav")]
    root = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
    if root.is_dir():
        files = sorted(f for f in root.glob("*.wav") if 1.5 < f.stat().st_size / 16000 < 8)  # 8 kHz PCM16
        out += [load_audio(f) for f in files[:20]]
    return out


def program(seconds: float, rng: random.Random, pool: list[np.ndarray], utterance_s: float = 0.0
            ) -> tuple[np.ndarray, list[tuple[int, int]]]:  # fmt: skip
    """Speech with pauses, and the true (start, end) samples of each utterance: one clip, or
    with ``utterance_s``, clips joined by 100 ms gaps until that long (a long turn)."""
    parts, segs, n = [np.zeros(8000, np.float32)], [], 8000
    gap = np.zeros(1600, np.float32)
    while n < seconds * 16000:
        c = rng.choice(pool)
        if utterance_s:  # one turn: the clips' own leading and trailing silences would end it
            c = trim_silence(c)
            while c.size < utterance_s * 16000:
                c = np.concatenate([c, gap, trim_silence(rng.choice(pool))])
        c = c[: int(min(max(utterance_s, 0.1), 24.0) * 16000)] if utterance_s else c  # within max_utterance_s
        segs.append((n, n + len(c)))
        pause = np.zeros(int(rng.uniform(1.0, 1.6) * 16000), np.float32)
        parts += [c, pause]
        n += len(c) + len(pause)
    return np.concatenate(parts), segs


async def stream(engine: Engine, audio: np.ndarray, segs: list[tuple[int, int]], cfg: SessionConfig) -> dict[str, list[float]]:
    s = await engine.open_session(cfg)
    sent_at: dict[int, float] = {}  # sample index at a chunk's end -> wall time it was sent
    lat: dict[str, list[float]] = {"first_partial": [], "endpoint": [], "final": [], "final_split": [], "analysis": [],
                                   "partial_lag": [], "partial_gap": [], "utterance": []}  # fmt: skip

    def sent_time(sample: int) -> float:
        k = min((k for k in sent_at if k >= sample), default=max(sent_at))
        return sent_at[k]

    def true_edge(t: float, side: int) -> int:
        """The true start (side 0) or end (1) of the speech nearest to ``t`` s, if within 1 s;
        else ``t`` itself: an utterance split at max_utterance_s starts or ends there."""
        edge = min((se[side] for se in segs), key=lambda e: abs(e / 16000 - t))
        return edge if abs(edge / 16000 - t) < 1.0 else round(t * 16000)

    async def reader() -> None:
        final_at: dict[int, float] = {}
        seen_partial: set[int] = set()
        last_partial: dict[int, float] = {}  # utterance id -> wall time of its last Partial
        async for ev in s.events():
            now = time.perf_counter()
            if isinstance(ev, Partial):
                # how far behind live the partial is: now - when its last audio was sent
                lat["partial_lag"].append(now - sent_time(round(ev.end * 16000)))
                if ev.utterance_id in last_partial:  # how often the text is updated
                    lat["partial_gap"].append(now - last_partial[ev.utterance_id])
                last_partial[ev.utterance_id] = now
            if isinstance(ev, Partial) and ev.utterance_id not in seen_partial:
                seen_partial.add(ev.utterance_id)
                lat["first_partial"].append(now - sent_time(true_edge(ev.start, 0)))
            elif isinstance(ev, SpeechEnded) and ev.reason == "silence":
                lat["endpoint"].append(now - sent_time(true_edge(ev.end, 1)))
            elif isinstance(ev, Final):
                edge = true_edge(ev.end, 1)
                split = edge == round(ev.end * 16000)  # ended by max_utterance_s, not by the speaker
                lat["final_split" if split else "final"].append(now - sent_time(edge))
                lat["utterance"].append(ev.end - ev.start)
                final_at[ev.utterance_id] = now
            elif isinstance(ev, Analysis) and ev.utterance_id in final_at:
                lat["analysis"].append(now - final_at[ev.utterance_id])

    task = asyncio.create_task(reader())
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    t0 = time.perf_counter()
    for i in range(0, len(pcm), CHUNK):
        await asyncio.sleep(max(0.0, t0 + i / 16000 - time.perf_counter()))
        await s.send(pcm[i : i + CHUNK].tobytes())
        sent_at[i + CHUNK] = time.perf_counter()
    await s.end()
    await task
    return lat


def pct(xs: list[float], q: float) -> str:
    return f"{np.percentile(xs, q) * 1000:6.0f}" if xs else "     -"


def memory_per_session(model: object) -> float:
    """Bytes of encoder/adapter caches for a 30 s utterance streamed in 0.48 s chunks."""
    cache = model.init_stream(24)  # type: ignore[attr-defined]
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        for i in range(0, 3000, 48):
            _, cache = model.encode_chunk(mel[:, :, i : i + 48], cache)  # type: ignore[attr-defined]
    # + the utterance audio and its log-mel, + the partials' LLM cache (keys and values of the
    # prompt and 375 speech frames in every layer)
    llm = model.cfg.llm  # type: ignore[attr-defined]
    heads = llm.get("num_key_value_heads", llm["num_attention_heads"])
    kv = 2 * llm["num_hidden_layers"] * heads * (llm["hidden_size"] // llm["num_attention_heads"]) * 4 * (375 + 40)
    return cache.nbytes() + 30 * 16000 * 4 + 3000 * 80 * 4 + kv


def load(name: str, overlay: Path | None = None, quantize: str = "none"):  # type: ignore[no-untyped-def]
    """A model by name; ``osum-mini-random`` is the prepared osum-mini base with a random adapter
    (same sizes and cost as the trained model; for timing only); ``overlay`` puts trained
    weights (e.g. a training run's ``best.safetensors``) on the osum-mini base. ``quantize``:
    as ``load_model``'s (int8 at load, layer by layer)."""
    from osum.loading import cache_dir, load_base_with_overlay, load_model

    int8 = quantize == "int8"
    if overlay is not None:
        return load_base_with_overlay(cache_dir() / "osum-mini", overlay, quantize=int8)
    if name != "osum-mini-random":
        return load_model(name, quantize=quantize)
    import tempfile

    from safetensors.torch import save_file

    from osum.config import PRESETS
    from osum.model import OsumModel
    from osum.train.trainer import overlay_state_dict

    torch.manual_seed(0)
    parts = OsumModel(PRESETS["osum-mini"], llm=torch.nn.Identity())  # the adapter side only
    overlay = {k: v.contiguous() for k, v in overlay_state_dict(parts).items()}
    path = Path(tempfile.mkdtemp()) / "random.safetensors"
    save_file(overlay, str(path))
    return load_base_with_overlay(cache_dir() / "osum-mini", path, quantize=int8)


def breakdown(model: object, cfg: SessionConfig, repeats: int = 3) -> None:
    """The final pass's parts on one real utterance with an idle worker, and the floor they
    put under "end of speech to Final" (best of ``repeats``)."""
    from osum.audio import log_mel
    from osum.inference import pad_mels
    from streaming.drafts import budget, verify_and_decode

    audio = clips()[0]
    seconds = audio.size / 16000

    def best(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
        out, times = None, []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    with torch.inference_mode():
        mel, lengths = pad_mels([log_mel(audio)])
        enc, (speech, n) = best(lambda: model.encode_speech(mel, lengths))  # type: ignore[attr-defined]
        speech = speech[0, : int(n[0])]
        limit = budget(seconds, 200)
        dec, (tokens, _, _) = best(lambda: verify_and_decode(model, speech, [], [], limit))  # type: ignore[arg-type]
        ver, _ = best(lambda: verify_and_decode(model, speech, [], tokens, limit))  # type: ignore[arg-type]
    step = max(0.0, dec - ver) / max(1, len(tokens) - 1)  # the steps after the first pass
    eager = cfg.eager_after_ms or cfg.vad.min_silence_ms
    floor = max(cfg.vad.min_silence_ms, eager + (enc + ver) * 1000)
    print(f"final pass parts, one {seconds:.1f} s utterance ({speech.shape[0]} speech frames, {len(tokens)} tokens), idle worker, best of {repeats}:")
    print(f"  full-context encoder {enc * 1000:6.0f} ms | LLM pass verifying a right draft {ver * 1000:6.0f} ms | "
          f"greedy decode from scratch {dec * 1000:6.0f} ms ({step * 1000:.0f} ms a token)")  # fmt: skip
    print(f"  floor for end of speech -> Final with a right draft: max(endpoint {cfg.vad.min_silence_ms} ms, eager start "
          f"{eager} ms + encoder + verifying pass) = {floor:.0f} ms")  # fmt: skip


async def run_streams(model: object, progs: list, cfg: SessionConfig, partial_load: float = 1.0  # type: ignore[type-arg]
                      ) -> tuple[list[dict[str, list[float]]], float, float, dict[str, list[float]]]:  # fmt: skip
    """All programs at once on one engine: per-stream latencies, CPU seconds, audio seconds,
    and the worker's seconds per request by kind (partial, final, analysis)."""
    engine = Engine(model, EngineOptions(max_sessions=max(64, len(progs)), partial_load=partial_load))
    await engine.start()
    worker: dict[str, list[float]] = {}
    for kind, runner in list(engine.scheduler._runners.items()):  # time each batch the worker runs

        def timed(reqs: list, runner=runner, name=kind.__name__.removesuffix("Request").lower()) -> list:  # type: ignore[no-untyped-def,type-arg]
            t = time.perf_counter()
            out = runner(reqs)
            worker.setdefault(name, []).extend([(time.perf_counter() - t) / len(reqs)] * len(reqs))
            return out

        engine.scheduler._runners[kind] = timed
    t0 = time.process_time()
    res = await asyncio.gather(*(stream(engine, a, s, cfg) for a, s in progs))
    cpu = time.process_time() - t0
    await engine.stop()
    return res, cpu, sum(len(a) for a, _ in progs) / 16000, worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="emotion,style,events")
    ap.add_argument("--overlay", type=Path, help="trained osum-mini weights on the prepared base (overrides --model)")
    ap.add_argument("--eager-final-ms", type=int, default=SessionConfig.eager_final_ms, help="0: eager finals off")
    ap.add_argument("--partial-step-ms", type=int, default=SessionConfig.partial_step_ms)
    ap.add_argument("--partial-context", choices=("full", "chunked"), default=SessionConfig.partial_context)
    ap.add_argument("--partial-growth", type=float, default=SessionConfig.partial_growth,
                    help="full-context partials: the step grows to this fraction of the utterance (0: fixed)")
    ap.add_argument("--utterance-s", type=float, default=0.0,
                    help="long turns: clips joined by 100 ms gaps into utterances this long (at most 24 s)")
    ap.add_argument("--partial-load", type=float, default=EngineOptions.partial_load,
                    help="space partials out while the worker is busier than this (1: never)")
    ap.add_argument("--quantize", choices=("none", "int8"), default="none")
    ap.add_argument("--breakdown", action="store_true", help="also time the final pass's parts on an idle worker")
    ap.add_argument("--words", action="store_true", help="sessions ask for word times (the model's aligner)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model, args.overlay, args.quantize)
    pool = clips()
    cfg = SessionConfig(tasks=tuple(t for t in args.tasks.split(",") if t), eager_final_ms=args.eager_final_ms,
                        partial_step_ms=args.partial_step_ms, word_times=args.words,
                        partial_context=args.partial_context, partial_growth=args.partial_growth)  # fmt: skip
    name = (f"osum-mini + {args.overlay}" if args.overlay else args.model) + (" (LLM int8)" if args.quantize == "int8" else "")
    growth = f", growing to {cfg.partial_growth:g} of the utterance" if cfg.partial_context == "full" and cfg.partial_growth else ""
    print(f"model {name}; {args.threads} threads; {cfg.partial_context}-context partials every {cfg.partial_step_ms} ms{growth}; endpoint silence "
          f"{cfg.vad.min_silence_ms} ms; eager final after {cfg.eager_after_ms} ms; {args.seconds:.0f} s of audio per stream"
          + ("; word times" if cfg.word_times else "")
          + (f"; partials spaced out above {args.partial_load:g} load" if args.partial_load < 1 else ""))  # fmt: skip
    print(f"{'streams':>7} {'utts':>5} {'mean s':>6} | {'first partial P50/P95 ms':>25} | {'partial lag P50/P95 ms':>22} | {'partial every P50/P95':>21} | {'endpoint P50/P95 ms':>20} "
          f"| {'final P50/P95 ms':>17} | {'analysis P50/P95 ms':>20} | {'CPU/audio':>9}")  # fmt: skip
    busy: list[tuple[int, int, dict[str, list[float]]]] = []
    splits: list[tuple[int, list[float]]] = []
    for n in (int(x) for x in args.streams.split(",")):
        rng = random.Random(n)
        progs = [program(args.seconds, rng, pool, args.utterance_s) for _ in range(n)]

        res, cpu, audio_s, worker = asyncio.run(run_streams(model, progs, cfg, args.partial_load))
        merged = {k: [x for r in res for x in r[k]] for k in res[0]}
        mean_s = float(np.mean(merged["utterance"])) if merged["utterance"] else 0.0
        print(f"{n:7d} {len(merged['final']) + len(merged['final_split']):5d} {mean_s:6.1f} | {pct(merged['first_partial'], 50)} / {pct(merged['first_partial'], 95):>6}          "
              f"| {pct(merged['partial_lag'], 50)} / {pct(merged['partial_lag'], 95):>6}       "
              f"| {pct(merged['partial_gap'], 50)} / {pct(merged['partial_gap'], 95):>6}      "
              f"| {pct(merged['endpoint'], 50)} / {pct(merged['endpoint'], 95):>6}     "
              f"| {pct(merged['final'], 50)} / {pct(merged['final'], 95):>6} | {pct(merged['analysis'], 50)} / {pct(merged['analysis'], 95):>6}     "
              f"| {cpu / audio_s / args.threads:5.2f}")  # fmt: skip
        busy.append((n, len(merged["final"]) + len(merged["final_split"]), worker))
        splits.append((n, merged["final_split"]))
    for n, split in splits:
        if split:
            print(f"  {n} streams: {len(split)} Finals of utterances split at max_utterance_s, from the split: "
                  f"P50/P95 {pct(split, 50).strip()}/{pct(split, 95).strip()} ms")  # fmt: skip
    print("the worker's time per request (P50/P95 ms), and requests run; finals past the Finals sent were eager passes for an end that did not come:")
    for n, finals, worker in busy:
        kinds = " | ".join(f"{k} {pct(v, 50).strip()}/{pct(v, 95).strip()} x{len(v)}" for k, v in sorted(worker.items()))
        print(f"  {n} streams ({finals} Finals): {kinds}")
    if args.breakdown:
        breakdown(model, cfg)
    print(f"memory per session, 30 s utterance (caches + audio + log-mel): {memory_per_session(model) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
