"""The null engine (the service without the model) on real speech with pauses."""

from __future__ import annotations

import asyncio

import numpy as np

from streaming.events import Analysis, Final, Partial, SpeechEnded, SpeechStarted
from streaming.null_engine import NullEngine
from streaming.session_base import SessionConfig


def test_null_engine_segments_real_speech_and_emits_every_event(male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    sil = np.zeros(16000, np.float32)
    audio = np.concatenate([sil, male_clip, sil, female_clip, sil, male_clip])  # the last one ends with the stream
    pcm = (audio * 32767).astype("<i2").tobytes()

    async def main() -> list:
        engine = NullEngine()
        await engine.start()
        s = await engine.open_session(SessionConfig(tasks=("emotion", "gender")))
        for i in range(0, len(pcm), 3200):
            await s.send(pcm[i : i + 3200])
        await s.end()
        events = [ev async for ev in s.events()]
        await engine.stop()
        return events

    events = asyncio.run(main())
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.utterance_id for f in finals] == [0, 1, 2]
    assert [f.reason for f in finals] == ["silence", "silence", "end_of_stream"]
    starts = [e.start for e in events if isinstance(e, SpeechStarted)]
    true_starts = [1.0, 1.0 + len(male_clip) / 16000 + 1, 2.0 + (len(male_clip) + len(female_clip)) / 16000 + 1]
    assert np.allclose(starts, true_starts, atol=0.5)  # an energy detector, not silero: close, not exact
    assert finals[0].end <= true_starts[1] and all(f.transcript == "null" for f in finals)
    assert sum(isinstance(e, Partial) for e in events) >= 3 and sum(isinstance(e, SpeechEnded) for e in events) == 3
    analyses = [e for e in events if isinstance(e, Analysis)]
    assert len(analyses) == 3 and set(analyses[0].tags) == {"emotion", "gender"}
    assert [e.seq for e in events] == list(range(len(events)))
