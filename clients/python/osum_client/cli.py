"""``osum-stream``: stream a file or the microphone to osum-live and print what comes back.

    osum-stream call.wav [--url ws://127.0.0.1:8080 | grpc://127.0.0.1:50051] [--tasks emotion,style,events]
    osum-stream --mic --protocol grpc
    osum-stream call.wav --json          # one event per line, for machines

On a terminal the running partial is rewritten in place; each final line shows its time,
transcript and tags. The API key comes from ``--api-key`` or ``OSUM_API_KEY``.
Exit status: 0 when the stream ended normally, 1 on a server error, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from typing import Any, TextIO

from .client import AsyncClient, ConnectionFailed, StreamOptions
from .events import Analysis, Begin, Error, Event, Final, Partial
from .sources import from_file, from_mic

__all__ = ["main", "format_final", "format_tags"]

DEFAULT_URLS = {"ws": "ws://127.0.0.1:8080", "grpc": "grpc://127.0.0.1:50051"}


def format_tags(a: Analysis) -> str:
    parts = []
    for kind, tag in sorted(a.tags.items()):
        score = f" {tag.score:.2f}" if tag.score is not None else ""
        parts.append(f"{kind}={tag.label}{score}")
    if a.reply:
        parts.append(f"reply={a.reply!r}")
    return "  [" + ", ".join(parts) + "]" if parts else ""


def format_final(f: Final) -> str:
    line = f"[{f.start:7.2f} - {f.end:7.2f}] {f.transcript.strip()}"
    if f.words:  # asked for with --words
        line += "\n" + "\n".join(f"    {w.start:7.2f} - {w.end:7.2f}  {w.word}" for w in f.words)
    return line


class Printer:
    """Human output: partial rewritten in place on a terminal; finals with their tags."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.tty = out, out.isatty()
        self.pending: dict[int, str] = {}  # utterance -> final line waiting for its tags
        self.partial_shown = False

    def _clear(self) -> None:
        if self.partial_shown:
            self.out.write("\r\033[K")
            self.partial_shown = False

    def event(self, ev: Event) -> None:
        if isinstance(ev, Partial) and self.tty:
            self._clear()
            self.out.write(f"... {ev.committed}\033[2m{ev.unstable}\033[0m"[-200:])
            self.partial_shown = True
        elif isinstance(ev, Final):
            self._clear()
            self.pending[ev.utterance_id] = format_final(ev)
            if not self.tty:  # tags follow on their own line when not on a terminal
                print(self.pending[ev.utterance_id], file=self.out)
        elif isinstance(ev, Analysis):
            line = self.pending.pop(ev.utterance_id, None)
            self._clear()
            print((line if self.tty and line else "") + format_tags(ev), file=self.out)
        elif isinstance(ev, Error):
            self._clear()
            print(f"error {ev.code}: {ev.message}", file=sys.stderr)
        self.out.flush()

    def close(self) -> None:
        self._clear()
        for line in self.pending.values():  # finals whose tags never came (no tasks)
            if self.tty:
                print(line, file=self.out)


def _json(ev: Event) -> str:
    return json.dumps({"type": type(ev).__name__, **dataclasses.asdict(ev)}, ensure_ascii=False)


async def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    url = args.url or DEFAULT_URLS[args.protocol]
    tasks = tuple(t for t in args.tasks.split(",") if t)
    opt = StreamOptions(tasks=tasks, realtime=not args.fast or args.mic, chat=args.chat,
                        interim_results=not args.no_partials, words=args.words)  # fmt: skip
    source: Any = from_mic(opt.sample_rate) if args.mic else from_file(args.file, opt.sample_rate)
    printer = None if args.json else Printer(out)
    failed = False
    try:
        async for ev in AsyncClient(url, args.api_key or os.environ.get("OSUM_API_KEY")).stream(source, opt):
            failed |= isinstance(ev, Error) and ev.fatal
            if printer is None:
                print(_json(ev), file=out, flush=True)
            elif not isinstance(ev, Begin):
                printer.event(ev)
    except ConnectionFailed as e:
        print(f"cannot reach the server: {e}", file=sys.stderr)
        return 1
    finally:
        if printer is not None:
            printer.close()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="osum-stream", description="stream audio to osum-live")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="a sound file (wav, flac, ogg...)")
    src.add_argument("--mic", action="store_true", help="stream the default microphone (needs osum-client[mic])")
    ap.add_argument("--url", help="ws://host:port or grpc://host:port (default: the local server)")
    ap.add_argument("--protocol", choices=("ws", "grpc"), default="ws", help="used when --url is not given")
    ap.add_argument("--tasks", default="emotion,style,events", help="comma-separated: emotion,style,events,gender,age")
    ap.add_argument("--chat", action="store_true", help="also get the model's reply to each utterance")
    ap.add_argument("--api-key", help="default: $OSUM_API_KEY")
    ap.add_argument("--json", action="store_true", help="one JSON event per line")
    ap.add_argument("--fast", action="store_true", help="send a file as fast as the server takes it, not in real time")
    ap.add_argument("--no-partials", action="store_true", help="finals only")
    ap.add_argument("--words", action="store_true", help="each final's word times (osum-mini)")
    args = ap.parse_args(argv)
    if args.url and args.url.startswith("grpc://"):
        args.protocol = "grpc"
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError, ValueError) as e:
        print(f"osum-stream: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
