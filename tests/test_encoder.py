"""The Whisper encoder against transformers, and chunked encoding against its block-causal reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osum.audio import log_mel
from osum.config import EncoderConfig
from osum.convert import whisper_hf_to_osum
from osum.encoder import WhisperEncoder
from osum.errors import AudioTooLongError

CFG = EncoderConfig(d_model=64, n_heads=4, n_layers=2, ffn_dim=128)


def _hf_encoder(n_positions: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    torch.manual_seed(seed)
    hf_cfg = WhisperConfig(
        num_mel_bins=80, d_model=CFG.d_model, encoder_layers=CFG.n_layers, encoder_attention_heads=CFG.n_heads,
        encoder_ffn_dim=CFG.ffn_dim, max_source_positions=n_positions, activation_function="gelu",
    )  # fmt: skip
    hf = HFWhisperEncoder(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits some biases; make every weight informative
        for p in hf.parameters():
            p.normal_(0, 0.1)
    return hf


@pytest.fixture(scope="module")
def speech_mel(male_clip: np.ndarray, female_clip: np.ndarray) -> torch.Tensor:
    """A 30 s mel of real speech (the two clips repeated), to cut lengths from."""
    audio = np.concatenate([male_clip, female_clip] * 5)[: 30 * 16000]
    return log_mel(audio)


@pytest.mark.parametrize("frames", [200, 812, 3000])
def test_forward_matches_transformers(speech_mel: torch.Tensor, frames: int) -> None:
    """Same weights, any length up to 30 s, no padding to 3000 frames: allclose in fp32."""
    hf = _hf_encoder(frames // 2)  # HF insists on exactly 2 * max_source_positions frames
    ours = WhisperEncoder(CFG).eval()
    sd = whisper_hf_to_osum(hf.state_dict())
    pe = sd.pop("embed.pos_enc.pe")  # HF's table is cut to this length; ours has all 1500 rows
    assert not ours.load_state_dict(sd, strict=False).unexpected_keys
    with torch.no_grad():
        ours.embed.pos_enc.pe[:, : frames // 2] = pe
    mel = speech_mel[None, :, :frames]
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
        out, lens = ours(mel)
    assert out.shape == ref.shape and int(lens[0]) == frames // 2
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_batch_equals_one_by_one(speech_mel: torch.Tensor) -> None:
    torch.manual_seed(0)
    enc = WhisperEncoder(CFG).eval()
    lengths = [301, 560, 77]
    batch = torch.zeros(3, 80, max(lengths))
    for i, n in enumerate(lengths):
        batch[i, :, :n] = speech_mel[:, i * 100 : i * 100 + n]
    with torch.no_grad():
        out, out_len = enc(batch, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            single, _ = enc(batch[i : i + 1, :, :n])
            torch.testing.assert_close(out[i, : int(out_len[i])], single[0], atol=1e-5, rtol=1e-5)


def _stream(enc: WhisperEncoder, mel: torch.Tensor, chunk: int, left: int, seed: int) -> torch.Tensor:
    """Feed mel frames in random-sized pieces, as audio arrives."""
    rng = np.random.default_rng(seed)
    cache = enc.init_cache(chunk, left)
    outs, pos = [], 0
    while pos < mel.shape[2]:
        n = int(rng.integers(0, 60))
        y, cache = enc.forward_chunk(mel[:, :, pos : pos + n], cache)
        assert y.shape[1] % chunk == 0  # only whole blocks before the end
        outs.append(y)
        pos += n
    y, cache = enc.forward_chunk(mel[:, :, :0], cache, final=True)
    outs.append(y)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(("frames", "chunk", "left"), [(500, 20, -1), (501, 16, 2), (1000, 50, 0), (333, 40, -1)])
def test_chunked_equals_block_causal_reference(speech_mel: torch.Tensor, frames: int, chunk: int, left: int) -> None:
    torch.manual_seed(1)
    enc = WhisperEncoder(CFG).eval()
    mel = speech_mel[None, :, :frames]
    with torch.no_grad():
        ref, _ = enc(mel, chunk_size=chunk, left_chunks=left)
        streamed = _stream(enc, mel, chunk, left, seed=frames)
    assert streamed.shape == ref.shape
    torch.testing.assert_close(streamed, ref, atol=1e-5, rtol=1e-5)


def test_one_chunk_covering_the_utterance_equals_full_attention(speech_mel: torch.Tensor) -> None:
    torch.manual_seed(2)
    enc = WhisperEncoder(CFG).eval()
    mel = speech_mel[None, :, :640]
    with torch.no_grad():
        full, _ = enc(mel)
        streamed = _stream(enc, mel, chunk=320, left=-1, seed=0)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)


def test_limited_context_difference_is_measured(speech_mel: torch.Tensor, capsys: pytest.CaptureFixture[str]) -> None:
    """Chunked encoding is not full attention; report by how much (not asserted equal)."""
    torch.manual_seed(3)
    enc = WhisperEncoder(CFG).eval()
    mel = speech_mel[None, :, :1000]
    with torch.no_grad():
        full, _ = enc(mel)
        rows = []
        for chunk, left in [(20, -1), (20, 4), (50, -1)]:
            chunked, _ = enc(mel, chunk_size=chunk, left_chunks=left)
            rel = float((chunked - full).norm() / full.norm())
            cos = float(torch.nn.functional.cosine_similarity(chunked, full, dim=-1).mean())
            rows.append((chunk, left, rel, cos))
    with capsys.disabled():
        for chunk, left, rel, cos in rows:
            print(f"\n[chunked vs full, random tiny encoder] chunk {chunk} left {left}: rel. error {rel:.3f}, mean cosine {cos:.3f}")
    assert all(r[2] > 0 for r in rows)  # it is an approximation: never silently the same computation


def test_too_long_is_refused(speech_mel: torch.Tensor) -> None:
    enc = WhisperEncoder(CFG).eval()
    mel = torch.zeros(1, 80, 3002)
    with pytest.raises(AudioTooLongError):
        enc(mel)
    cache = enc.init_cache(20)
    with pytest.raises(AudioTooLongError):
        for _ in range(40):
            _, cache = enc.forward_chunk(torch.zeros(1, 80, 100), cache)
