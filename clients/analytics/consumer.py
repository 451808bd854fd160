"""Follow every call live: a Redis Streams consumer of osum-live's results.

osum-serve appends every Final and Analysis to the stream ``osum:results`` (and to
``osum:results:<session id>``). Each entry has the fields ``session_id``, ``seq``, ``type``
(Final | Analysis) and ``event`` (the event as JSON, as the WebSocket protocol sends it).
Consumer groups give at-least-once delivery across any number of workers: each entry goes
to one consumer of the group and stays pending until acknowledged, so a worker that
crashes gets its pending entries back when it restarts (it reads them first).

    python clients/analytics/consumer.py --redis-url redis://127.0.0.1:6379/0 --group dashboard

prints one line per result, e.g.::

    3f2a... #0  final     "I'd like to cancel my order."
    3f2a... #0  analysis  emotion=angry 0.71 style=... events=...

Replace :func:`handle` with your own (write to a database, update a dashboard, alert on
anger). It needs only ``redis`` (``pip install redis``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

STREAM = "osum:results"


def handle(entry: dict[str, Any]) -> None:
    """What to do with one result; here: print it."""
    ev = entry["event"]
    sid, utt = entry["session_id"][:8], ev.get("utterance_id")
    if entry["type"] == "Final":
        print(f"{sid} #{utt}  final     {json.dumps(ev.get('transcript', ''), ensure_ascii=False)}", flush=True)
    else:
        tags = " ".join(f"{k}={v['label']}" + (f" {v['score']:.2f}" if v.get("score") is not None else "")
                        for k, v in ev.get("tags", {}).items())  # fmt: skip
        print(f"{sid} #{utt}  analysis  {tags}", flush=True)


async def consume(url: str, group: str, consumer: str, on_entry: Callable[[dict[str, Any]], None] = handle,
                  from_start: bool = False, max_entries: int | None = None, block_ms: int = 5000) -> int:  # fmt: skip
    """Read the group's share of ``osum:results`` until ``max_entries`` (forever when None).

    Returns the number of entries handled. Each is acknowledged after ``on_entry`` returns.
    """
    import redis.asyncio as redis
    from redis.exceptions import ResponseError

    r = redis.from_url(url, decode_responses=True)
    try:
        try:
            await r.xgroup_create(STREAM, group, id="0" if from_start else "$", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):  # the group exists: carry on where it is
                raise
        done, cursor = 0, "0"  # first our own pending entries (after a crash), then new ones (">")
        while max_entries is None or done < max_entries:
            count = 100 if max_entries is None else min(100, max_entries - done)
            reply = await r.xreadgroup(group, consumer, {STREAM: cursor}, count=count, block=None if cursor == "0" else block_ms)
            entries = reply[0][1] if reply else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            for entry_id, fields in entries:
                on_entry({**fields, "seq": int(fields["seq"]), "event": json.loads(fields["event"]), "id": entry_id})
                await r.xack(STREAM, group, entry_id)
                done += 1
        return done
    finally:
        await r.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description="follow osum-live results in Redis")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--group", default="analytics")
    ap.add_argument("--consumer", default=socket.gethostname())
    ap.add_argument("--from-start", action="store_true", help="a new group starts at the oldest kept result")
    ap.add_argument("--max", type=int, help="stop after this many results")
    args = ap.parse_args()
    try:
        asyncio.run(consume(args.redis_url, args.group, args.consumer, from_start=args.from_start, max_entries=args.max))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
