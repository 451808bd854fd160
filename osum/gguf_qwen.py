"""Dequantise a Qwen2 GGUF file (llama.cpp's format) into transformers' Qwen2 weights.

The ``gguf`` package (llama.cpp's own reader) parses the file and dequantises each
tensor (Q4_K, Q5_0, Q6_K, Q8_0, F32...) to float32 in numpy's row-major order, which is
PyTorch's ``(out, in)`` layout. llama.cpp does not permute q/k for the qwen2
architecture (it uses NeoX-style rotary embeddings, as transformers does), so only
the names change.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["read_qwen2_gguf"]

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def read_qwen2_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Returns the Qwen2ForCausalLM state dict and the model's sizes (Qwen2Config keyword arguments)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on junk
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    if fields.get("general.architecture") != "qwen2":
        raise CheckpointError(f"{path}: architecture {fields.get('general.architecture')!r} is not qwen2")
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _NAMES.get(t.name)
        if name is None:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
            if not m or m.group(2) not in _BLOCK:
                raise CheckpointError(f"{path}: unexpected tensor {t.name}")
            name = f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
        arr = dequantize(t.data, t.tensor_type)
        sd[name] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(dtype)  # a writable copy
    vocab = sd["model.embed_tokens.weight"].shape[0]
    sizes = dict(
        vocab_size=vocab,
        hidden_size=int(fields["qwen2.embedding_length"]),
        intermediate_size=int(fields["qwen2.feed_forward_length"]),
        num_hidden_layers=int(fields["qwen2.block_count"]),
        num_attention_heads=int(fields["qwen2.attention.head_count"]),
        num_key_value_heads=int(fields["qwen2.attention.head_count_kv"]),
        max_position_embeddings=int(fields["qwen2.context_length"]),
        rope_theta=float(fields["qwen2.rope.freq_base"]),
        rms_norm_eps=float(fields["qwen2.attention.layer_norm_rms_epsilon"]),
        tie_word_embeddings="lm_head.weight" not in sd,
        bos_token_id=151643,
        eos_token_id=151643,
    )
    return sd, sizes
