"""Stream a sound file to osum-live and print each utterance with its tags.

    python clients/python/examples/transcribe_file.py call.wav [ws://127.0.0.1:8080 | grpc://127.0.0.1:50051]

Set OSUM_API_KEY when the server needs a key.
"""

import asyncio
import os
import sys

from osum_client import Analysis, AsyncClient, Error, Final, StreamOptions, from_file


async def main(path: str, url: str) -> None:
    options = StreamOptions(tasks=("emotion", "style", "events"), realtime=False)  # as fast as the server takes it
    async with AsyncClient(url, api_key=os.environ.get("OSUM_API_KEY")) as client:
        async for ev in client.stream(from_file(path), options):
            if isinstance(ev, Final):
                print(f"[{ev.start:6.2f}-{ev.end:6.2f}] #{ev.utterance_id} {ev.transcript}")
            elif isinstance(ev, Analysis):
                print("    " + ", ".join(f"{kind}: {tag.label}" for kind, tag in ev.tags.items()))
            elif isinstance(ev, Error):
                print(f"error {ev.code}: {ev.message}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8080"))
