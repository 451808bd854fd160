"""osum-client: stream audio to osum-live and get transcripts and tags back, over gRPC or WebSocket.

See :mod:`osum_client.client` for the API and ``osum-stream --help`` for the command line.
"""

from .client import FINALIZE, AsyncClient, Client, ConnectionFailed, StreamOptions
from .events import Analysis, Begin, Error, Event, Final, Partial, ReplyDelta, SpeechStarted, Tag, UtteranceEnd, Word
from .sources import from_array, from_file, from_mic, paced

__all__ = [
    "AsyncClient", "Client", "StreamOptions", "FINALIZE", "ConnectionFailed",
    "Event", "Begin", "SpeechStarted", "Partial", "Final", "Word", "Tag", "Analysis", "ReplyDelta", "UtteranceEnd", "Error",
    "from_file", "from_array", "from_mic", "paced",
]  # fmt: skip
