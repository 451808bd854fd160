"""One code path on CUDA: LLM in bf16, encoder and adapter in fp32 (runs where a GPU is present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osum.audio import log_mel
from osum.decoding import DecodingOptions
from osum.inference import recognize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_bf16_matches_cpu(male_clip: np.ndarray) -> None:
    from osum.loading import load_model

    cpu = load_model("tiny")
    gpu = load_model("tiny", "cuda")
    assert gpu.llm_dtype == torch.bfloat16 and gpu.encoder.after_norm.weight.dtype == torch.float32
    with torch.no_grad():
        a, _ = cpu.encode_speech(log_mel(male_clip)[None])
        b, _ = gpu.encode_speech(log_mel(male_clip)[None])
    torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)
    r = recognize(gpu, [male_clip], "ser", DecodingOptions(max_new_tokens=8))[0]
    assert len(r.tokens) == 8 and r.tags[0].scores is not None
