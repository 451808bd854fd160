"""The wire protocol's generated code is fresh and its messages round-trip."""

from __future__ import annotations

import subprocess
import sys

from streaming.proto import speech_pb2 as pb


def test_generated_code_is_not_stale() -> None:
    proc = subprocess.run([sys.executable, "-m", "streaming.proto.generate", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_request_and_response_round_trip() -> None:
    cfg = pb.StreamingRecognitionConfig(
        config=pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=8000,
                                    analysis_tasks=["emotion", "gender"]),  # fmt: skip
        interim_results=True, resume_token="tok", last_seq=41,
    )  # fmt: skip
    req = pb.StreamingRecognizeRequest(streaming_config=cfg)
    again = pb.StreamingRecognizeRequest.FromString(req.SerializeToString())
    assert again.WhichOneof("streaming_request") == "streaming_config"
    assert list(again.streaming_config.config.analysis_tasks) == ["emotion", "gender"] and again.streaming_config.last_seq == 41
    resp = pb.StreamingRecognizeResponse(seq=7, analysis=pb.Analysis(utterance_id=2, tags={"emotion": pb.Label(label="happy", score=0.75)}))
    back = pb.StreamingRecognizeResponse.FromString(resp.SerializeToString())
    assert back.analysis.tags["emotion"].label == "happy" and back.analysis.tags["emotion"].score == 0.75
