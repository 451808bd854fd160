"""Weight-name maps from other Whisper formats to OSUM's (WeNet) key names.

OSUM stores its Whisper encoder under WeNet names; transformers' ``WhisperEncoder``
uses others. The map is one-to-one (``transformers`` name -> OSUM name):

    conv1 / conv2                          -> embed.conv.0 / embed.conv.2
    embed_positions.weight (n_ctx, d)      -> embed.pos_enc.pe (1, n_ctx, d)
    layers.N.self_attn.{q,k,v,out}_proj    -> encoders.N.self_attn.linear_{q,k,v,out}
    layers.N.self_attn_layer_norm          -> encoders.N.norm1
    layers.N.fc1 / fc2                     -> encoders.N.feed_forward.w_1 / w_2
    layers.N.final_layer_norm              -> encoders.N.norm2
    layer_norm                             -> after_norm
"""

from __future__ import annotations

import re

import torch

__all__ = ["whisper_hf_to_osum"]

_RULES = (
    (r"^conv1\.", "embed.conv.0."),
    (r"^conv2\.", "embed.conv.2."),
    (r"^layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"encoders.\1.self_attn.linear_\2."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"encoders.\1.self_attn.linear_out."),
    (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"encoders.\1.norm1."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"encoders.\1.norm2."),
    (r"^layers\.(\d+)\.fc1\.", r"encoders.\1.feed_forward.w_1."),
    (r"^layers\.(\d+)\.fc2\.", r"encoders.\1.feed_forward.w_2."),
    (r"^layer_norm\.", "after_norm."),
)


def whisper_hf_to_osum(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``WhisperEncoder`` state dict -> OSUM encoder state dict (no ``encoder.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k.removeprefix("model.encoder.").removeprefix("encoder.")
        if k == "embed_positions.weight":
            out["embed.pos_enc.pe"] = v[None]
            continue
        for pat, rep in _RULES:
            new, n = re.subn(pat, rep, k)
            if n:
                out[new] = v
                break
        else:
            raise KeyError(f"unknown Whisper encoder key {k!r}")
    return out
