"""Whisper's audio encoder, whole-utterance and chunk by chunk.

Module and buffer names are OSUM's checkpoint keys (WeNet's ``conv1d2`` input layer
and ``abs_pos_whisper`` table): ``embed.conv.{0,2}``, ``embed.pos_enc.pe``,
``encoders.N.*``, ``after_norm``.

Two ways to run it:

* :meth:`WhisperEncoder.forward` on a whole (batch of) utterance(s): full attention,
  equal to ``transformers.WhisperEncoder`` on the same weights, at any length up to
  30 s and without padding to 3000 frames. With ``chunk_size`` it applies the
  block-causal mask that chunked encoding implies (the reference for the test below).
* :meth:`WhisperEncoder.forward_chunk` for a live stream: mel frames go in as they
  arrive; each ``chunk_size`` output frames (50 Hz) are encoded as one block that
  attends to itself and to the cached keys/values of up to ``left_chunks`` earlier
  blocks. Chunk by chunk equals ``forward(mel, chunk_size=..., left_chunks=...)``
  exactly. It can never equal the full-attention ``forward`` on more than one chunk,
  because there frame 0 attends to the last frame: OSUM was trained with full
  attention only, so streaming uses chunks for partial results and the full pass for
  the final one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .errors import AudioTooLongError, InvalidConfigError
from .transformer import KV, TransformerLayer, chunk_mask, padding_mask, sinusoids, stream_blocks

__all__ = ["EncoderCache", "WhisperEncoder", "encoded_length"]


def encoded_length(mel_frames: torch.Tensor | int) -> torch.Tensor | int:
    """Frames after the stride-2 conv (k 3, padding 1): ceil(T / 2)."""
    return (mel_frames - 1) // 2 + 1


class _PosEnc(nn.Module):
    def __init__(self, n_ctx: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoids(n_ctx, d_model, interleaved=False))  # (1, n_ctx, d)


class _ConvEmbed(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        # indices 0 and 2 are the checkpoint's conv.0 / conv.2 (1 and 3 are GELUs)
        self.conv = nn.Sequential(
            nn.Conv1d(cfg.n_mels, cfg.d_model, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(cfg.d_model, cfg.d_model, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.pos_enc = _PosEnc(cfg.n_ctx, cfg.d_model)


@dataclass
class EncoderCache:
    """One stream's encoder state between :meth:`WhisperEncoder.forward_chunk` calls."""

    chunk_size: int  # output frames (50 Hz) per block
    left_chunks: int  # blocks of left context, < 0 for all
    mel_tail: torch.Tensor | None = None  # (B, n_mels, k): mel frames still needed by the convs
    mel_start: int = 0  # mel index of mel_tail[..., 0]
    conv_out: int = 0  # frames produced by the conv front end so far
    pending: torch.Tensor | None = None  # (B, n, d): conv output waiting for a whole block
    offset: int = 0  # frames already through the transformer layers
    kv: list[KV] = field(default_factory=list)

    def nbytes(self) -> int:
        ts = [t for t in (self.mel_tail, self.pending) if t is not None]
        return sum(kv.nbytes for kv in self.kv) + sum(t.numel() * t.element_size() for t in ts)


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = _ConvEmbed(cfg)
        self.encoders = nn.ModuleList(
            TransformerLayer(cfg.d_model, cfg.n_heads, cfg.ffn_dim, "gelu", key_bias=False) for _ in range(cfg.n_layers)
        )
        self.after_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)

    def forward(
        self,
        mel: torch.Tensor,
        lengths: torch.Tensor | None = None,
        chunk_size: int | None = None,
        left_chunks: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode whole utterances.

        Args:
            mel: shape = (B, n_mels, T), right-padded; T <= 3000.
            lengths: (B,) valid mel frames; None = all T.
            chunk_size: None for full attention (OSUM), else the block-causal mask of chunked encoding.
        Returns:
            (B, ceil(T / 2), d_model) and the (B,) output lengths.
        """
        B, _, T = mel.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=mel.device)
        n_out = int(encoded_length(T))
        if n_out > self.cfg.n_ctx:
            raise AudioTooLongError(f"{T} mel frames exceed the encoder's {2 * self.cfg.n_ctx} (30 s)")
        conv0, _, conv2, _ = self.embed.conv
        h = F.gelu(conv0(mel))
        # zero the first conv's output past each length, so the strided conv sees what a
        # lone utterance sees (its own zero padding): batched == one by one
        h = h * padding_mask(lengths, T)[:, None, :].to(h.dtype)
        x = F.gelu(conv2(h)).transpose(1, 2)  # (B, n_out, d)
        x = x + self.embed.pos_enc.pe[:, :n_out].to(x.dtype)
        out_lengths = encoded_length(lengths)
        mask = padding_mask(out_lengths, n_out)[:, None, None, :]  # (B, 1, 1, n_out)
        if chunk_size is not None:
            mask = mask & chunk_mask(n_out, chunk_size, left_chunks, x.device)[None, None]
        for layer in self.encoders:
            x, _ = layer(x, mask)
        return self.after_norm(x), out_lengths

    # ---- streaming -------------------------------------------------------------------

    def init_cache(self, chunk_size: int, left_chunks: int = -1) -> EncoderCache:
        if chunk_size <= 0:
            raise InvalidConfigError(f"chunk_size must be positive, got {chunk_size}")
        return EncoderCache(chunk_size=chunk_size, left_chunks=left_chunks)

    def forward_chunk(self, mel: torch.Tensor, cache: EncoderCache, final: bool = False) -> tuple[torch.Tensor, EncoderCache]:
        """Encode the next mel frames of a stream.

        Args:
            mel: shape = (B, n_mels, t), the frames that follow those already given (t may be 0).
            cache: from :meth:`init_cache` or the previous call; it is not modified.
            final: the stream ends here: encode everything, including a last partial block.
        Returns:
            the newly encoded frames (B, k, d), k a multiple of ``chunk_size`` unless final,
            and the new cache.
        """
        return self.forward_chunks([mel], [cache], [final])[0]

    def forward_chunks(
        self, mels: list[torch.Tensor], caches: list[EncoderCache], finals: list[bool]
    ) -> list[tuple[torch.Tensor, EncoderCache]]:
        """:meth:`forward_chunk` for several streams at once (each mel (1, n_mels, t_r); one
        stream alone may have several rows).

        The conv front end runs per stream (it is cheap); the transformer layers run the
        streams' blocks as one batch, each row on its own cache and positions
        (:func:`~osum.transformer.stream_blocks`). Every stream gets what it gets alone (up to
        rounding). The streams must share ``chunk_size`` and ``left_chunks``.
        """
        if len({(c.chunk_size, c.left_chunks) for c in caches}) > 1:
            raise ValueError("streams batched together must share chunk_size and left_chunks")
        ready, rest = [], []
        for mel, cache, final in zip(mels, caches, finals):
            conv, cache = self._conv_chunk(mel, cache, final)
            pending = conv if cache.pending is None else torch.cat([cache.pending, conv], dim=1)
            n_ready = pending.shape[1] if final else pending.shape[1] // cache.chunk_size * cache.chunk_size
            if cache.offset + n_ready > self.cfg.n_ctx:
                raise AudioTooLongError(f"stream exceeds the encoder's {self.cfg.n_ctx} positions (30 s)")
            ready.append(pending[:, :n_ready])
            rest.append(replace(cache, pending=pending[:, n_ready:]))
        if not caches:
            return []
        C, left = caches[0].chunk_size, caches[0].left_chunks
        pe = self.embed.pos_enc.pe
        outs, kvs, offsets = stream_blocks(
            self.encoders, ready, [c.kv or None for c in rest], [c.offset for c in rest], C,
            -1 if left < 0 else left * C, lambda x, o: x + pe[:, o : o + x.shape[1]].to(x.dtype),
        )  # fmt: skip
        return [(self.after_norm(y), replace(c, offset=o, kv=kv or [])) for y, c, o, kv in zip(outs, rest, offsets, kvs)]

    def _conv_chunk(self, mel: torch.Tensor, cache: EncoderCache, final: bool) -> tuple[torch.Tensor, EncoderCache]:
        """The conv front end on a stream, exact: each output waits for its right context.

        Output j needs first-conv frames 2j-1 .. 2j+1, which need mel frames 2j-2 .. 2j+2.
        """
        conv0, _, conv2, _ = self.embed.conv
        seg = mel if cache.mel_tail is None else torch.cat([cache.mel_tail, mel], dim=2)
        s, L, j = cache.mel_start, seg.shape[2], cache.conv_out
        if L == 0:
            return mel.new_zeros(mel.shape[0], 0, self.cfg.d_model), cache
        h = F.gelu(conv0(seg))  # local i <-> mel frame s + i; h[0] is wrong if s > 0, h[-1] unless final
        first = 2 * j - 1 - s  # local index of the first first-conv frame still needed
        end = L if final else L - 1
        parts = [h[..., max(first, 0) : end]]
        if first < 0:  # the stream's start: the strided conv's own left zero padding
            parts.insert(0, h.new_zeros(h.shape[0], h.shape[1], 1))
        if final:  # the stream's end: its right zero padding
            parts.append(h.new_zeros(h.shape[0], h.shape[1], 1))
        h = torch.cat(parts, dim=2)
        if h.shape[2] >= 3:
            y = F.gelu(F.conv1d(h, conv2.weight, conv2.bias, stride=2)).transpose(1, 2)  # (B, n, d)
        else:
            y = h.new_zeros(h.shape[0], 0, self.cfg.d_model)
        j += y.shape[1]
        keep = max(2 * j - 2, 0)  # mel index from which the next output's inputs start
        tail = seg[..., keep - s :] if keep >= s else seg
        return y, replace(cache, mel_tail=tail, mel_start=max(keep, s), conv_out=j)
