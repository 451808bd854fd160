"""Pre-LN transformer layers shared by the Whisper encoder and OSUM's adapter.

Module names follow WeNet (``self_attn.linear_q``, ``feed_forward.w_1``, ``norm1``...),
which are the key names of OSUM's checkpoint. Layers hold weights only: a key/value
cache goes in and the grown cache comes back out, as in WeNet's ``forward_chunk``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KV",
    "FeedForward",
    "MultiHeadAttention",
    "TransformerLayer",
    "chunk_mask",
    "forward_block",
    "forward_blocks",
    "padding_mask",
    "sinusoids",
    "stream_blocks",
]  # fmt: skip



class _KVStore:
    """Growable key/value buffers shared by the successive caches of one stream."""

    __slots__ = ("filled", "k", "v")

    def __init__(self, like: torch.Tensor, capacity: int) -> None:
        B, h, _, hd = like.shape
        self.k = like.new_empty(B, h, capacity, hd)
        self.v = like.new_empty(B, h, capacity, hd)
        self.filled = 0  # frames written; a cache may append in place only if it ends here


class KV:
    """One layer's keys and values of a stream, each (B, n_heads, S, head_dim).

    Appending writes into a buffer that doubles when full, so a chunk costs no copy of
    the whole cache. Caches stay values: appending to a cache that is not the newest of
    its buffer (an older cache used again) copies instead of overwriting what the newer
    one holds.
    """

    __slots__ = ("_store", "length", "start")

    def __init__(self, store: _KVStore | None = None, length: int = 0, start: int = 0) -> None:
        self._store, self.length, self.start = store, length, start

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        """A new cache holding this one's window plus ``k``/``v`` (B, h, T, hd)."""
        T, st = k.shape[2], self._store
        end = self.length + T
        if st is None or st.filled != self.length or end > st.k.shape[2]:
            new = _KVStore(k, max(2 * (end - self.start), 64))
            if st is not None and self.length > self.start:
                new.k[:, :, : self.length - self.start] = st.k[:, :, self.start : self.length]
                new.v[:, :, : self.length - self.start] = st.v[:, :, self.start : self.length]
            new.filled = self.length - self.start
            st, end, base = new, new.filled + T, new.filled
            start = 0
        else:
            base, start = self.length, self.start
        st.k[:, :, base:end] = k
        st.v[:, :, base:end] = v
        st.filled = end
        return KV(st, end, start)

    def window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the cached keys and values."""
        if self._store is None:
            raise ValueError("empty cache")
        return self._store.k[:, :, self.start : self.length], self._store.v[:, :, self.start : self.length]

    def trimmed(self, max_frames: int) -> KV:
        """Keep only the last ``max_frames`` frames (< 0: all)."""
        if max_frames < 0 or self.length - self.start <= max_frames:
            return self
        return KV(self._store, self.length, self.length - max_frames)

    @property
    def nbytes(self) -> int:
        st = self._store
        return 0 if st is None else 2 * st.k.numel() * st.k.element_size()


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, key_bias: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model, bias=key_bias)  # Whisper has no key bias
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KV | list[KV] | None) -> tuple[torch.Tensor, KV | list[KV] | None]:
        """x: (B, T, d); mask: bool (B|1, 1, T, S), True = attend.

        Without a cache the frames attend among themselves (mask applies). With one, they
        attend to its S0 cached frames and to themselves, and the grown cache is returned.
        With a list (one single-row cache per row: rows of different streams, each with its
        own history) row b attends to its own cached frames and itself; ``mask`` must be None.
        """
        B, T, d = x.shape
        h = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, h, d // h).transpose(1, 2)  # (B, h, T, hd)

        q, k, v = heads(self.linear_q(x)), heads(self.linear_k(x)), heads(self.linear_v(x))
        if isinstance(cache, list):
            cache = [c.append(k[b : b + 1], v[b : b + 1]) for b, c in enumerate(cache)]
            k, v, mask = _stack_windows(cache)
        elif cache is not None:
            cache = cache.append(k, v)
            k, v = cache.window()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, hd)
        return self.linear_out(y.transpose(1, 2).reshape(B, T, d)), cache


def _stack_windows(caches: list[KV]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' windows (1, h, S_b, hd) -> right-padded (B, h, max S, hd) keys and values and
    the (B, 1, 1, max S) mask of each row's own frames."""
    wins = [c.window() for c in caches]
    S = max(k.shape[2] for k, _ in wins)
    k0 = wins[0][0]
    keys = k0.new_zeros(len(wins), k0.shape[1], S, k0.shape[3])
    values = torch.zeros_like(keys)
    lengths = torch.empty(len(wins), dtype=torch.long)
    for b, (k, v) in enumerate(wins):
        keys[b, :, : k.shape[2]], values[b, :, : v.shape[2]] = k[0], v[0]
        lengths[b] = k.shape[2]
    return keys, values, padding_mask(lengths.to(k0.device), S)[:, None, None, :]


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation: str) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, ffn_dim)
        self.w_2 = nn.Linear(ffn_dim, d_model)
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class TransformerLayer(nn.Module):
    """Pre-LN block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, activation: str, key_bias: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, key_bias)
        self.feed_forward = FeedForward(d_model, ffn_dim, activation)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KV | list[KV] | None = None
    ) -> tuple[torch.Tensor, KV | list[KV] | None]:
        a, new_cache = self.self_attn(self.norm1(x), mask, cache)
        x = x + a
        return x + self.feed_forward(self.norm2(x)), new_cache


def padding_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) lengths -> bool (B, size), True on valid frames."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def chunk_mask(size: int, chunk_size: int, left_chunks: int, device: torch.device | None = None) -> torch.Tensor:
    """Block-causal attention mask, True = attend; shape = (size, size).

    Frame i sees the frames of its own chunk and of up to ``left_chunks`` earlier
    chunks (all of them when ``left_chunks < 0``). For size 6, chunk 2, all left::

        [[1, 1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [1, 1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0, 0],
         [1, 1, 1, 1, 1, 1],
         [1, 1, 1, 1, 1, 1]]
    """
    block = torch.arange(size, device=device) // chunk_size
    q, k = block[:, None], block[None, :]
    mask = k <= q
    if left_chunks >= 0:
        mask &= k >= q - left_chunks
    return mask


def sinusoids(length: int, channels: int, interleaved: bool) -> torch.Tensor:
    """Sinusoidal positions, shape = (1, length, channels).

    ``interleaved=False`` is Whisper's table ([sin | cos] halves); ``True`` is WeNet's
    ``abs_pos`` (sin on even channels, cos on odd ones).
    """
    if interleaved:
        pos = torch.arange(length, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * -(math.log(10000.0) / channels))
        pe = torch.zeros(length, channels)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        return pe[None]
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)[None]


def forward_block(
    layers: nn.ModuleList, x: torch.Tensor, caches: list[KV] | None, max_cache: int
) -> tuple[torch.Tensor, list[KV]]:
    """Run one chunk through ``layers``: it attends to itself and to every cached frame.

    Args:
        x: shape = (B, T, d), one chunk.
        caches: one (k, v) per layer from earlier chunks, or None for the first chunk.
        max_cache: frames of left context to keep for the next chunk (< 0: keep all).
    Returns:
        the chunk's output (B, T, d) and the new caches, trimmed to ``max_cache`` frames.
    """
    new: list[KV] = []
    for i, layer in enumerate(layers):
        x, kv = layer(x, None, KV() if caches is None else caches[i])
        new.append(kv.trimmed(max_cache))
    return x, new


def forward_blocks(
    layers: nn.ModuleList, x: torch.Tensor, caches: list[list[KV] | None], max_cache: int
) -> tuple[torch.Tensor, list[list[KV]]]:
    """:func:`forward_block` for one chunk of each of several streams, in one batch.

    Args:
        x: shape = (R, T, d), row r the next chunk of stream r (same T for all).
        caches: per stream, its per-layer caches from earlier chunks (batch 1), or None.
        max_cache: as for :func:`forward_block`.
    Returns:
        (R, T, d) and, per stream, its new per-layer caches: each row exactly what
        :func:`forward_block` gives that stream alone (up to rounding).
    """
    per_layer: list[list[KV]] = []
    for i, layer in enumerate(layers):
        x, kvs = layer(x, None, [KV() if c is None else c[i] for c in caches])
        per_layer.append([kv.trimmed(max_cache) for kv in kvs])
    return x, [list(row) for row in zip(*per_layer)]


def stream_blocks(
    layers: nn.ModuleList,
    xs: list[torch.Tensor],
    caches: list[list[KV] | None],
    offsets: list[int],
    block: int,
    max_cache: int,
    embed: Callable[[torch.Tensor, int], torch.Tensor],
) -> tuple[list[torch.Tensor], list[list[KV] | None], list[int]]:
    """The next frames of several streams through ``layers``, block by block, batched across streams.

    Args:
        xs: per stream (1, n_r, d): its frames ready for the layers, cut into blocks of
            ``block`` frames (a shorter last block only at a stream's end). A stream on its
            own may have several rows (B, n, d) that share one history.
        caches, offsets: per stream, its caches (None: none yet) and frames already through.
        embed: ``embed(x, offset)`` -> the layers' input for frames starting at ``offset``.
    Returns:
        per stream its outputs (1, n_r, d), caches and offsets. The j-th blocks of all
        streams that have a whole one run as one batch; a short last block runs alone.
    """
    if len(xs) > 1 and any(x.shape[0] != 1 for x in xs):
        raise ValueError("streams batched together must have one row each")
    caches, offsets = list(caches), list(offsets)
    outs: list[list[torch.Tensor]] = [[] for _ in xs]
    for start in range(0, max((x.shape[1] for x in xs), default=0), block):
        full = [r for r, x in enumerate(xs) if x.shape[1] >= start + block]
        short = [r for r, x in enumerate(xs) if start < x.shape[1] < start + block]
        groups = ([full] if full else []) + [[r] for r in short]
        for rows in groups:
            x = torch.cat([embed(xs[r][:, start : start + block], offsets[r]) for r in rows])
            if len(rows) == 1:
                y, new = forward_block(layers, x, caches[rows[0]], max_cache)
                news = [new]
            else:
                y, news = forward_blocks(layers, x, [caches[r] for r in rows], max_cache)
            for i, r in enumerate(rows):
                outs[r].append(y if len(rows) == 1 else y[i : i + 1])
                caches[r], offsets[r] = news[i], offsets[r] + y.shape[1]
    return [torch.cat(o, dim=1) if o else x[:, :0] for o, x in zip(outs, xs)], caches, offsets
