"""OSUM's adapter: encoder frames (50 Hz) -> LLM embeddings (12.5 Hz).

Three parts, named as in OSUM's checkpoint:

1. ``down_sample_2``: three left-padded Conv1d (k 3; strides 1, 2, 2; GELU), 4x down.
   Being causal, it runs chunk by chunk with exactly the offline result.
2. ``speech_transformer``: WeNet TransformerEncoder (Linear + LayerNorm input layer,
   ``x * sqrt(d) + PE`` with interleaved sin/cos, pre-LN blocks with ReLU FFN and
   biased q/k/v, final ``after_norm``). Full attention offline; chunk by chunk it
   attends to cached keys/values, like the encoder.
3. ``speech_llama_proj``: Linear to the LLM width (lives on :class:`osum.model.OsumModel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .transformer import KV, TransformerLayer, chunk_mask, padding_mask, sinusoids, stream_blocks

__all__ = ["AdapterCache", "CausalConvSubsampling4", "SpeechTransformer", "subsampled_length"]

_STRIDES = (1, 2, 2)
_CONV_IDX = (1, 4, 7)  # positions of the convs in OSUM's Sequential (pad, conv, gelu) x 3


def subsampled_length(n: torch.Tensor | int) -> torch.Tensor | int:
    """Frames after the three causal convs: ceil(ceil(n / 2) / 2), as OSUM's mask[0::2][0::2]."""
    n = (n - 1) // 2 + 1
    return (n - 1) // 2 + 1


class CausalConvSubsampling4(nn.Module):
    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.ConstantPad1d((2, 0), 0.0), nn.Conv1d(idim, odim, 3, stride=1), nn.GELU(),
            nn.ConstantPad1d((2, 0), 0.0), nn.Conv1d(odim, odim, 3, stride=2), nn.GELU(),
            nn.ConstantPad1d((2, 0), 0.0), nn.Conv1d(odim, odim, 3, stride=2), nn.GELU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, idim) -> (B, subsampled_length(T), odim)."""
        return self.conv(x.transpose(1, 2)).transpose(1, 2)

    def forward_chunk(self, x: torch.Tensor, state: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Causal streaming: each conv keeps the input frames its next output needs.

        Args:
            x: (B, t, idim), the next encoder frames.
            state: per conv, its retained input (B, C, k) starting 2 frames before its next
                output's stride position; None at the stream's start (zero left padding).
        """
        h = x.transpose(1, 2)
        new_state = []
        for n, (i, stride) in enumerate(zip(_CONV_IDX, _STRIDES)):
            conv: nn.Conv1d = self.conv[i]  # type: ignore[assignment]
            prev = h.new_zeros(h.shape[0], h.shape[1], 2) if state is None else state[n]
            buf = torch.cat([prev, h], dim=2)
            if buf.shape[2] >= 3:
                y = F.gelu(conv(buf))  # stride applied by the conv itself
                used = y.shape[2] * stride  # inputs consumed by the outputs made
            else:
                y, used = buf.new_zeros(buf.shape[0], conv.out_channels, 0), 0
            new_state.append(buf[..., used:])
            h = y
        return h.transpose(1, 2), new_state


class _PosEnc(nn.Module):
    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoids(max_len, d_model, interleaved=True))  # (1, max_len, d)


class _LinearEmbed(nn.Module):
    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        # checkpoint keys out.0 (Linear) and out.1 (LayerNorm); out.2 is dropout
        self.out = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.LayerNorm(cfg.d_model, eps=1e-5), nn.Dropout(0.0))
        self.pos_enc = _PosEnc(cfg.max_len, cfg.d_model)
        self.xscale = math.sqrt(cfg.d_model)

    def forward(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        x = self.out(x) * self.xscale
        return x + self.pos_enc.pe[:, offset : offset + x.shape[1]].to(x.dtype)


@dataclass
class AdapterCache:
    """One stream's adapter state between chunks."""

    conv: list[torch.Tensor] | None = None
    offset: int = 0
    kv: list[KV] = field(default_factory=list)
    left_context: int = -1  # adapter frames of left context, < 0 for all

    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.kv) + sum(t.numel() * t.element_size() for t in self.conv or [])


class SpeechTransformer(nn.Module):
    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.embed = _LinearEmbed(cfg)
        self.encoders = nn.ModuleList(
            TransformerLayer(cfg.d_model, cfg.n_heads, cfg.ffn_dim, "relu", key_bias=True) for _ in range(cfg.n_layers)
        )
        self.after_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, chunk_size: int | None = None, left_chunks: int = -1) -> torch.Tensor:
        """x: (B, T, d) right-padded, lengths (B,) -> (B, T, d). Full attention unless chunk_size."""
        T = x.shape[1]
        mask = padding_mask(lengths, T)[:, None, None, :]
        if chunk_size is not None:
            mask = mask & chunk_mask(T, chunk_size, left_chunks, x.device)[None, None]
        x = self.embed(x, 0)
        for layer in self.encoders:
            x, _ = layer(x, mask)
        return self.after_norm(x)

    def forward_chunks(
        self, xs: list[torch.Tensor], caches: list[AdapterCache], block: int
    ) -> list[tuple[torch.Tensor, AdapterCache]]:
        """Streams' next frames (each (1, t_r, d), or one stream of several rows), whole blocks
        of ``block`` frames but at a stream's end; each block attends to itself and its
        stream's cached frames. Batched across streams, which must share ``left_context``."""
        if len({c.left_context for c in caches}) > 1:
            raise ValueError("streams batched together must share left_context")
        if not caches:
            return []
        outs, kvs, offsets = stream_blocks(self.encoders, xs, [c.kv or None for c in caches], [c.offset for c in caches],
                                           block, caches[0].left_context, self.embed)  # fmt: skip
        return [(self.after_norm(y), replace(c, offset=o, kv=kv or [])) for y, c, o, kv in zip(outs, caches, offsets, kvs)]
