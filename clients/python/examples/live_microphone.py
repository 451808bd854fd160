"""Live captions from the microphone, synchronously (needs: pip install './clients/python[mic]').

    python clients/python/examples/live_microphone.py [ws://127.0.0.1:8080]

Ctrl-C to stop. Partials are rewritten in place; finals stay.
"""

import sys

from osum_client import Client, Final, Partial, StreamOptions, from_mic

url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8080"
try:
    for ev in Client(url).stream(from_mic(), StreamOptions(realtime=False)):  # the microphone paces itself
        if isinstance(ev, Partial):
            print(f"\r\033[K{ev.text}", end="", flush=True)
        elif isinstance(ev, Final):
            print(f"\r\033[K{ev.transcript}", flush=True)
except KeyboardInterrupt:
    pass
