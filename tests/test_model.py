"""The adapter, the whole speech path chunk by chunk, and the LLM splice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osum.adapter import CausalConvSubsampling4, subsampled_length
from osum.audio import log_mel
from osum.errors import InvalidConfigError


def test_causal_conv_streams_exactly() -> None:
    torch.manual_seed(0)
    conv = CausalConvSubsampling4(16, 24).eval()
    x = torch.randn(1, 203, 16)
    with torch.no_grad():
        ref = conv(x)
        assert ref.shape[1] == subsampled_length(203) == 51
        rng = np.random.default_rng(0)
        outs, state, pos = [], None, 0
        while pos < x.shape[1]:
            n = int(rng.integers(0, 9))
            y, state = conv.forward_chunk(x[:, pos : pos + n], state)
            outs.append(y)
            pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-6, rtol=1e-6)


def test_speech_stream_equals_block_causal_reference(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    mel = log_mel(male_clip)[None]
    chunk = 20  # encoder frames = 0.4 s; 5 speech embeddings per chunk
    with torch.no_grad():
        ref, ref_len = tiny_model.encode_speech(mel, chunk_size=chunk)
        cache = tiny_model.init_stream(chunk)
        outs, pos = [], 0
        for n in [7, 33, 0, 101, 59, 200]:
            y, cache = tiny_model.encode_chunk(mel[:, :, pos : pos + n], cache)
            outs.append(y)
            pos += n
        y, cache = tiny_model.encode_chunk(mel[:, :, pos:], cache, final=True)
        outs.append(y)
    streamed = torch.cat(outs, dim=1)
    assert streamed.shape[1] == int(ref_len[0]) == 50  # 4.0 s at 12.5 Hz
    torch.testing.assert_close(streamed, ref, atol=1e-5, rtol=1e-5)
    assert cache.nbytes() > 0


@pytest.mark.parametrize("left_chunks", [-1, 2])
def test_streams_encoded_together_equal_each_alone(tiny_model, male_clip: np.ndarray, left_chunks: int) -> None:  # type: ignore[no-untyped-def]
    """Several sessions' chunks in one batch (each on its own cache, at its own offset, some
    with no whole block yet, one ending): each gets what it gets encoded alone."""
    rng = np.random.default_rng(1)
    clips = [male_clip, male_clip[4000:] * 0.5, rng.standard_normal(48000).astype(np.float32) * 0.1]
    mels = [log_mel(c)[None] for c in clips]
    sizes = [[40, 0, 17, 90, 55, 64], [3, 120, 41, 40, 9, 33], [80, 80, 1, 40, 200, 7]]
    alone = [tiny_model.init_stream(16, left_chunks) for _ in clips]
    together = list(alone)
    pos = [0, 0, 0]
    with torch.no_grad():
        for step in range(6):
            final = [False, False, step == 5]  # the third stream ends at the last step
            new = []
            for r in range(3):
                n = mels[r].shape[2] - pos[r] if final[r] else sizes[r][step]
                new.append(mels[r][:, :, pos[r] : pos[r] + n])
                pos[r] += n
            batched = tiny_model.encode_chunks(new, together, final)
            blocks = 0
            for r in range(3):
                y, alone[r] = tiny_model.encode_chunk(new[r], alone[r], final=final[r])
                torch.testing.assert_close(batched[r][0], y, atol=1e-5, rtol=1e-5)
                assert batched[r][1].encoder.offset == alone[r].encoder.offset
                assert batched[r][1].adapter.offset == alone[r].adapter.offset
                blocks += y.shape[1]
            together = [c for _, c in batched]
            assert blocks > 0 or step == 0
    assert alone[2].encoder.offset == together[2].encoder.offset > 0


def test_stream_cache_is_not_mutated(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Caches go in and come back out: replaying a chunk from an old cache gives the same output."""
    mel = log_mel(male_clip)[None]
    with torch.no_grad():
        c0 = tiny_model.init_stream(16)
        _, c1 = tiny_model.encode_chunk(mel[:, :, :64], c0)
        a, _ = tiny_model.encode_chunk(mel[:, :, 64:128], c1)
        b, _ = tiny_model.encode_chunk(mel[:, :, 64:128], c1)
    torch.testing.assert_close(a, b)


def test_chunk_size_must_align_with_adapter(tiny_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidConfigError):
        tiny_model.init_stream(10)


def test_splice_layout(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """[pad, prompt, speech-begin, speech, speech-end, text], left-padded; positions restart per row."""
    with torch.no_grad():
        speech, lens = tiny_model.encode_speech(log_mel(male_clip)[None])
        speech = torch.cat([speech, speech])
        lens = torch.tensor([int(lens[0]), 40])
        inp = tiny_model.splice([[11, 12, 13], [11]], speech, lens, [[7], []])
    table = tiny_model.llm.get_input_embeddings().weight
    begin, end = tiny_model.boundary_embeddings()
    S = inp.embeds.shape[1]
    assert S == 3 + 1 + 50 + 1 + 1
    row0 = inp.embeds[0]
    torch.testing.assert_close(row0[0], table[11])
    torch.testing.assert_close(row0[3], begin)
    torch.testing.assert_close(row0[4:54], speech[0, :50])
    torch.testing.assert_close(row0[54], end)
    torch.testing.assert_close(row0[55], table[7])
    n1 = 1 + 1 + 40 + 1
    assert inp.attention_mask[1].tolist() == [0] * (S - n1) + [1] * n1
    assert inp.position_ids[1, -1] == n1 - 1 and inp.position_ids[0, -1] == S - 1
    torch.testing.assert_close(inp.embeds[1, S - n1], table[11])
    torch.testing.assert_close(inp.embeds[1, -1], end)


def test_reusing_an_old_cache_never_corrupts_a_newer_one(tiny_model, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """KV buffers are shared between successive caches; an older cache used again must copy, not overwrite."""
    mel = log_mel(male_clip)[None]
    with torch.no_grad():
        c1 = tiny_model.init_stream(16)
        _, c1 = tiny_model.encode_chunk(mel[:, :, :64], c1)
        _, c2 = tiny_model.encode_chunk(mel[:, :, 64:128], c1)
        expected, _ = tiny_model.encode_chunk(mel[:, :, 128:192], c2)
        _ = tiny_model.encode_chunk(torch.randn(1, 80, 64), c1)  # branch off the older cache
        again, _ = tiny_model.encode_chunk(mel[:, :, 128:192], c2)
    torch.testing.assert_close(again, expected)


def test_int8_llm_decodes_close_to_fp32(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """quantize='int8' puts the LLM's linear layers in int8; the model still decodes and its
    next-token distribution stays close to the fp32 one (the WER cost on osum-mini is measured
    by osum.train.evaluate, not here)."""
    import copy

    import pytest
    import torch

    from osum.errors import InvalidConfigError
    from osum.loading import load_model

    q = copy.deepcopy(tiny_model).quantize_llm()
    assert q.quantized == "int8" and tiny_model.quantized is None
    linears = [m for m in q.llm.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every linear layer was replaced
    ids = torch.randint(0, 1000, (1, 12))
    with torch.inference_mode():
        a = tiny_model.llm(input_ids=ids).logits.float().log_softmax(-1)
        b = q.llm(input_ids=ids).logits.float().log_softmax(-1)
    kl = float((a.exp() * (a - b)).sum(-1).mean())
    # the random tiny LLM is nearly uniform, so compare with how far its distributions at
    # different positions are from each other: int8 must be far closer than that
    other = a[:, torch.arange(12).roll(1)]
    spread = float((a.exp() * (a - other)).sum(-1).mean())
    assert kl < 0.05 * spread
    # a token's result does not depend on the rest of its batch (with one activation scale per
    # call, as PyTorch's dynamic quantisation has, the louder row below changes the quieter's logits)
    x = torch.randn(2, 12, tiny_model.cfg.llm["hidden_size"])
    x[1] *= 30
    with torch.inference_mode():
        both = q.llm(inputs_embeds=x).logits
        alone = q.llm(inputs_embeds=x[:1]).logits
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-5)
    with pytest.raises(InvalidConfigError):
        load_model("tiny", quantize="int4")
    assert load_model("tiny", quantize="int8").quantized == "int8"  # at load, layer by layer
    assert load_model("tiny", quantize="auto").quantized is None  # auto: int8 only where measured (osum-mini)
