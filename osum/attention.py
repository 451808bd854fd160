"""Attention whose rows do not depend on how the tokens were grouped into calls.

A streaming Final verifies a draft: one forward pass over [prompt, speech, draft]. Offline
recognition computes the same positions as one pass over [prompt, speech], then one token a
call. The linear layers give each token the same bits either way (``osum.int8`` quantises each
token on its own scale), but attention does not: a query row computed among several, against
more keys, comes out different in the last bits from the same row computed alone, and with
int8 layers a last-bit difference can cross a rounding step and flip a greedy choice (seen on
osum-mini: logits up to 2.0 apart after six tokens).

``"osum_rows"`` (registered with transformers' ``AttentionInterface``) is transformers' own
eager attention, except that inside :func:`rows_singly_from` the rows from a given index on
are computed one by one, each against exactly the keys an incremental step would see. With
the int8 LLM, a verified draft then has bit for bit the logits and cache that decoding it one
token at a time gives (tested), for no measurable cost (osum-mini, 86 positions: 223 vs 221 ms).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

__all__ = ["ROWS", "rows_singly_from", "use_row_attention"]

ROWS = "osum_rows"
_SINGLE_FROM: contextvars.ContextVar[int | None] = contextvars.ContextVar("osum_single_rows_from", default=None)


def _rows(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: torch.Tensor | None, scaling: float, dropout: float, j: int | None,
          **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """One batch of rows whose queries are the last q of the kv positions -> (B, q, H, D)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if j is None or q_len <= 1 or j >= q_len:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)[0]

    def part(lo: int, hi: int) -> torch.Tensor:  # rows lo..hi-1, keys up to the last of them
        n = kv_len - q_len + hi
        mask = None if attention_mask is None else attention_mask[:, :, lo:hi, :n]
        return eager_attention_forward(module, query[:, :, lo:hi], key[:, :, :n], value[:, :, :n], mask, scaling, dropout, **kwargs)[0]

    parts = [part(0, j)] if j > 0 else []  # as the pass that had only these rows
    parts += [part(i, i + 1) for i in range(j, q_len)]  # as incremental steps
    return torch.cat(parts, dim=1)


def _span(flags: torch.Tensor) -> slice | torch.Tensor:
    """Where ``flags`` (n,) is true: a slice when that is one run (left padding), else indices."""
    idx = flags.nonzero()[:, 0]
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    return slice(lo, hi) if hi - lo == idx.numel() else idx


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """query (B, H, q, D), key/value (B, H_kv, kv, D), mask (B, 1, q, kv) or None ->
    (B, q, H, D). The last q of the kv positions are the query's.

    With several rows, each is computed on its own against only the keys its mask lets it
    see (padding and masked-out positions dropped, not just masked), so a row's bits are
    what the same tokens give alone: one session's result never depends on its batch.
    """
    j = _SINGLE_FROM.get()
    B = query.shape[0]
    if B == 1 or attention_mask is None:
        return _rows(module, query, key, value, attention_mask, scaling, dropout, j, **kwargs), None
    seen = attention_mask[:, 0] == 0 if attention_mask.dtype != torch.bool else attention_mask[:, 0]  # (B, q, kv)
    out = query.new_zeros(B, query.shape[2], query.shape[1], query.shape[3])  # rows that see nothing (padding): 0
    for b in range(B):
        rows, keys = seen[b].any(-1), seen[b].any(0)
        if not bool(rows.any()):
            continue
        r, k = _span(rows), _span(keys)
        q_b = query[b : b + 1, :, r]
        mask_b = attention_mask[b : b + 1, :, r][..., k]
        skipped = 0 if j is None else int((~rows[:j]).sum())  # padding rows before the singly-computed ones
        out[b, r] = _rows(module, q_b, key[b : b + 1, :, k], value[b : b + 1, :, k], mask_b, scaling, dropout,
                          None if j is None else j - skipped, **kwargs)[0]  # fmt: skip
    return out, None


AttentionInterface.register(ROWS, _attention)
# and eager's masks: a name transformers does not know would get none for a causal pass
AttentionMaskInterface.register(ROWS, eager_mask)


def use_row_attention(llm: torch.nn.Module) -> None:
    """Make ``llm`` (a transformers model) attend with ``"osum_rows"``."""
    llm.config._attn_implementation = ROWS  # its layers read it from this shared config


@contextlib.contextmanager
def rows_singly_from(index: int) -> Iterator[None]:
    """Within this block, forward passes compute attention rows ``index`` onwards (of each
    call's new tokens) one at a time, as incremental decoding would."""
    token = _SINGLE_FROM.set(index)
    try:
        yield
    finally:
        _SINGLE_FROM.reset(token)
