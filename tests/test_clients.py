"""The Python SDK and ``osum-stream`` against real servers (127.0.0.1, port 0), the tiny model."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
from osum_client import FINALIZE, AsyncClient, Client, StreamOptions, from_array
from osum_client.events import Analysis, Begin, Error, Final, SpeechStarted

from streaming.auth import Authenticator
from streaming.engine import Engine, EngineOptions
from streaming.grpc_server import serve as serve_grpc
from streaming.scheduler import SchedulerOptions
from streaming.session_base import SessionConfig
from streaming.store import RedisStore
from streaming.ws_server import serve_ws

from .redis_server import redis_server

OPTS = EngineOptions(scheduler=SchedulerOptions(final_max_tokens=6))
SIL = np.zeros(16000, np.float32)
KEY = "k-sdk-0123456789abcdef"
FAST = StreamOptions(tasks=("emotion",), realtime=False)


class Servers:
    """Both servers over one engine, as osum-serve runs them."""

    def __init__(self, model, options=OPTS, store=None, auth=None, ws_port: int = 0) -> None:  # type: ignore[no-untyped-def]
        self.model, self.options, self.store, self.auth, self.ws_port = model, options, store, auth, ws_port

    async def __aenter__(self) -> Servers:
        self.engine = Engine(self.model, self.options, store=self.store)
        await self.engine.start()
        self.ws, self.ws_port = await serve_ws(self.engine, port=self.ws_port, auth=self.auth)
        self.grpc, self.grpc_port = await serve_grpc(self.engine, auth=self.auth)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.engine.accepting = False
        self.ws.close(close_connections=False)
        await self.engine.stop(drain=True)
        await self.grpc.stop(None)
        self.ws.close()
        await self.ws.wait_closed()


async def _events(url: str, source, options: StreamOptions = FAST, key: str | None = None) -> list:  # type: ignore[no-untyped-def]
    return [ev async for ev in AsyncClient(url, key).stream(source, options)]


def test_sdk_gives_the_same_results_over_both_protocols(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    audio = np.concatenate([SIL, male_clip, SIL, female_clip, SIL])

    async def main() -> tuple[list, list, list]:
        async with Servers(tiny_model, auth=Authenticator({KEY: "sdk"})) as s:
            ws = await _events(f"ws://127.0.0.1:{s.ws_port}", from_array(audio), key=KEY)
            grpc = await _events(f"grpc://127.0.0.1:{s.grpc_port}", from_array(audio), key=KEY)
            refused = await _events(f"grpc://127.0.0.1:{s.grpc_port}", from_array(audio), key="wrong-key-0123456789")
            return ws, grpc, refused

    ws, grpc, refused = asyncio.run(main())
    for events in (ws, grpc):
        assert isinstance(events[0], Begin) and events[0].resume_token
        assert [e.seq for e in events[1:]] == list(range(len(events) - 1))
        assert [e.utterance_id for e in events if isinstance(e, SpeechStarted)] == [0, 1]
        assert {type(e) for e in events} >= {Final, Analysis}
    finals = [[e.transcript for e in ev if isinstance(e, Final)] for ev in (ws, grpc)]
    assert finals[0] == finals[1] and len(finals[0]) == 2
    assert [e.code for e in refused] == ["unauthenticated"] and refused[0].fatal


def test_sdk_reports_the_servers_error_code_over_both_protocols(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """An error that ends a begun stream (the session-length limit, hit while the client is still
    writing as fast as it can) and a refusal before the session begins (over capacity) reach the
    SDK's user as the server's own code on both protocols, and the stream ends. Over gRPC the
    mid-stream one comes in-band, because grpc-python may turn the status into INTERNAL."""
    audio = np.concatenate([SIL, male_clip, male_clip])

    async def main() -> tuple[list, list, list, list]:
        async with Servers(tiny_model, replace(OPTS, max_session_s=2.0)) as s:
            urls = (f"ws://127.0.0.1:{s.ws_port}", f"grpc://127.0.0.1:{s.grpc_port}")
            limited = [await _events(u, from_array(audio)) for u in urls]
        async with Servers(tiny_model, replace(OPTS, max_sessions=1)) as s:
            await s.engine.open_session(SessionConfig())  # takes the only place
            urls = (f"ws://127.0.0.1:{s.ws_port}", f"grpc://127.0.0.1:{s.grpc_port}")
            full = [await _events(u, from_array(audio)) for u in urls]
        return *limited, *full

    ws_limited, grpc_limited, ws_full, grpc_full = asyncio.run(main())
    for events in (ws_limited, grpc_limited):
        assert isinstance(events[0], Begin)
        errors = [e for e in events if isinstance(e, Error)]
        assert [(e.code, e.fatal) for e in errors] == [("limit_exceeded", True)]
    for events in (ws_full, grpc_full):
        assert [(e.code, e.fatal) for e in events if isinstance(e, Error)] == [("over_capacity", True)] and len(events) == 1


def test_sdk_resumes_across_a_server_restart_without_losing_or_repeating(tiny_model, male_clip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    audio = np.concatenate([SIL, male_clip, SIL, male_clip, SIL])

    async def source(stop_server):  # type: ignore[no-untyped-def]
        for i, chunk in enumerate(from_array(audio, chunk_ms=100)):
            if i == 40:  # mid-way through the second utterance: restart the server
                await stop_server()
            yield chunk

    async def main(url: str) -> list:
        first = Servers(tiny_model, store=RedisStore(url))
        await first.__aenter__()
        port = first.ws_port

        async def restart() -> None:
            await first.__aexit__()  # drains: the open utterance is finished, stored; close 1012
            second.ws_port = port
            await second.__aenter__()

        second = Servers(tiny_model, store=RedisStore(url))
        try:
            return await _events(f"ws://127.0.0.1:{port}", source(restart))
        finally:
            await second.__aexit__()

    with redis_server(tmp_path) as url:
        events = asyncio.run(main(url))
    begins = [e for e in events if isinstance(e, Begin)]
    assert len(begins) == 2 and begins[0].session_id == begins[1].session_id and begins[1].audio_offset > 0
    seqs = [e.seq for e in events if not isinstance(e, Begin)]
    assert seqs == sorted(set(seqs))  # nothing repeated, in order
    finals = [e for e in events if isinstance(e, Final)]
    ids = [f.utterance_id for f in finals]
    assert ids == sorted(set(ids)) and len(ids) >= 2  # numbering continued on the new server
    assert all(b.start >= a.end for a, b in zip(finals, finals[1:]))
    errors = [(e.code, e.message) for e in events if isinstance(e, Error)]
    assert not errors, errors


def test_finalize_in_the_source_and_the_sync_client(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[list, list]:
        async with Servers(tiny_model) as s:
            chunks = list(from_array(np.concatenate([SIL, male_clip]), chunk_ms=100))
            url = f"ws://127.0.0.1:{s.ws_port}"
            forced = await _events(url, [*chunks, FINALIZE, *from_array(SIL[:8000])], replace(FAST, endpointing_ms=5000, eager_final_ms=0))
            sync = await asyncio.to_thread(lambda: list(Client(url).stream(chunks, FAST)))
            return forced, sync

    forced, sync = asyncio.run(main())
    assert [type(e) for e in forced if isinstance(e, Final)] == [Final]  # ended by FINALIZE, not by 5 s of silence
    assert any(isinstance(e, Final) for e in sync) and isinstance(sync[0], Begin)


def test_osum_stream_cli(tiny_model, male_clip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wav = tmp_path / "call.wav"
    sf.write(wav, np.concatenate([SIL, male_clip, SIL]), 16000)

    async def cli(*args: str) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "osum_client.cli", *args,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
        out, err = await p.communicate()
        return p.returncode or 0, out.decode(), err.decode()

    async def main() -> list:
        async with Servers(tiny_model) as s:
            return [
                await cli(str(wav), "--url", f"ws://127.0.0.1:{s.ws_port}", "--json", "--fast", "--tasks", "emotion"),
                await cli(str(wav), "--url", f"grpc://127.0.0.1:{s.grpc_port}", "--fast", "--tasks", "emotion,gender"),
                await cli(str(wav), "--url", f"ws://127.0.0.1:{s.ws_port}", "--tasks", "nonsense", "--fast"),
            ]

    (rc1, out1, _), (rc2, out2, _), (rc3, _, err3) = asyncio.run(main())
    lines = [json.loads(x) for x in out1.splitlines()]
    assert rc1 == 0 and lines[0]["type"] == "Begin" and {"Final", "Analysis"} <= {x["type"] for x in lines}
    final = next(x for x in lines if x["type"] == "Final")
    assert rc2 == 0 and final["transcript"].strip() in out2 and "emotion=" in out2 and "gender=" in out2
    assert rc3 == 1 and "invalid_config" in err3


def test_the_documented_example_runs(tiny_model, male_clip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wav = tmp_path / "call.wav"
    sf.write(wav, np.concatenate([SIL, male_clip, SIL]), 16000)
    example = Path(__file__).resolve().parent.parent / "clients" / "python" / "examples" / "transcribe_file.py"

    async def main() -> tuple[int, str]:
        async with Servers(tiny_model) as s:
            p = await asyncio.create_subprocess_exec(sys.executable, str(example), str(wav), f"grpc://127.0.0.1:{s.grpc_port}",
                                                     stdout=asyncio.subprocess.PIPE)  # fmt: skip
            out, _ = await p.communicate()
            return p.returncode or 0, out.decode()

    rc, out = asyncio.run(main())
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("[") and "#0" in lines[0] and "emotion:" in lines[1]


def test_chat_replies_stream_as_they_are_written(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """Voice chat: ReplyDelta pieces arrive before the Analysis and join into its reply, on both protocols."""
    from osum_client import ReplyDelta

    audio = np.concatenate([SIL, male_clip, SIL])
    opts = replace(FAST, tasks=(), chat=True)

    async def main() -> list[list]:
        async with Servers(tiny_model) as s:
            return [await _events(f"ws://127.0.0.1:{s.ws_port}", from_array(audio), opts),
                    await _events(f"grpc://127.0.0.1:{s.grpc_port}", from_array(audio), opts)]  # fmt: skip

    for events in asyncio.run(main()):
        analysis = next(e for e in events if isinstance(e, Analysis))
        deltas = [e for e in events if isinstance(e, ReplyDelta)]
        assert len(deltas) >= 2 and all(d.seq < analysis.seq and d.utterance_id == analysis.utterance_id for d in deltas)
        joined = "".join(d.delta for d in deltas)  # a split multi-byte character at the very end is held back
        assert analysis.reply and joined.strip() == analysis.reply.rstrip("\ufffd").strip()


def test_osum_stream_prints_word_times_under_their_final() -> None:
    from osum_client.cli import format_final
    from osum_client.events import Word

    f = Final(3, "s", 0, "hello world", 1.0, 2.0, 0.9, (Word("hello", 1.02, 1.4), Word("world", 1.45, 1.9)))
    assert format_final(f).splitlines() == ["[   1.00 -    2.00] hello world", "       1.02 -    1.40  hello", "       1.45 -    1.90  world"]
    assert format_final(replace(f, words=())) == "[   1.00 -    2.00] hello world"


def test_sdk_partial_options_reach_the_session_over_both_protocols(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """``partial_step_ms``, ``partial_growth`` and ``partial_context`` of StreamOptions are the
    session's, over WebSocket and gRPC; a bad value is the client's ``invalid_config``."""
    audio = np.concatenate([SIL, male_clip, SIL])
    asked = replace(FAST, tasks=(), partial_step_ms=960, partial_growth=0.25, partial_context="chunked")

    async def main() -> dict[str, tuple]:
        async with Servers(tiny_model) as s:
            urls = {"ws": f"ws://127.0.0.1:{s.ws_port}", "grpc": f"grpc://127.0.0.1:{s.grpc_port}"}
            out = {}
            for name, url in urls.items():
                for label, opt in (("asked", asked), ("default", replace(FAST, tasks=()))):
                    seen, finals = None, 0
                    async for ev in AsyncClient(url).stream(from_array(audio), opt):
                        if isinstance(ev, Begin):  # the server's session, while it is open
                            c = s.engine.sessions[ev.session_id].session.config
                            seen = (c.partial_step_ms, c.partial_growth, c.partial_context)
                        finals += isinstance(ev, Final)
                    out[f"{name}-{label}"] = (seen, finals)
                bad = await _events(url, from_array(audio), replace(FAST, partial_context="causal"))
                out[f"{name}-bad"] = tuple(e.code for e in bad if isinstance(e, Error))
            return out

    out = asyncio.run(main())
    for name in ("ws", "grpc"):
        assert out[f"{name}-asked"] == ((960, 0.25, "chunked"), 1)
        assert out[f"{name}-default"] == ((480, 0.1, "full"), 1)
        assert out[f"{name}-bad"] == ("invalid_config",)
