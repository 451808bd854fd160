"""Read CTranslate2 ``model.bin`` files and map Whisper's weights to transformers' names.

CTranslate2 has no Python API to read weights back, and its format is small
(``ctranslate2/specs/model_spec.py``, binary version 6), all little-endian::

    u32 version, str name, u32 revision, u32 n_vars
    n_vars x (str name, u8 rank, u32 dims[rank], u8 dtype, u32 n_bytes, bytes)
    u32 n_aliases, n_aliases x (str alias, str target)
    str = u16 length (counting a trailing NUL), bytes, NUL

dtype codes: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16. The Whisper spec fuses the
self-attention q/k/v into ``linear_0`` and the cross-attention k/v into ``linear_1``;
Whisper has no key bias, so the fused k bias is zero and dropped.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["read_ct2", "ct2_whisper_to_hf"]

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def _read(f: BinaryIO, fmt: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise CheckpointError("CTranslate2 file ends early (truncated?)")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (n,) = _read(f, "<H")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError("CTranslate2 file ends early (truncated?)")
    return raw.rstrip(b"\0").decode("utf-8")


def read_ct2(path: str | Path) -> dict[str, torch.Tensor]:
    """All variables of a CTranslate2 model file, aliases resolved, as tensors (dtypes kept)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    with path.open("rb") as f:
        (version,) = _read(f, "<I")
        if version != 6:
            raise CheckpointError(f"{path}: CTranslate2 binary version {version}, expected 6")
        _string(f)  # spec name, e.g. WhisperSpec
        _read(f, "<I")  # spec revision
        (n_vars,) = _read(f, "<I")
        for _ in range(n_vars):
            name = _string(f)
            (rank,) = _read(f, "<B")
            dims = _read(f, f"<{rank}I") if rank else ()
            (code,) = _read(f, "<B")
            (n_bytes,) = _read(f, "<I")
            raw = f.read(n_bytes)
            if len(raw) != n_bytes:
                raise CheckpointError(f"{path}: variable {name} is cut short (truncated file?)")
            if code == 5:  # bf16: no numpy dtype; go through int16 bits
                t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16)
            elif code in _DTYPES:
                t = torch.from_numpy(np.frombuffer(raw, dtype=_DTYPES[code]).copy())
            else:
                raise CheckpointError(f"{path}: variable {name} has unknown dtype code {code}")
            tensors[name] = t.reshape(dims)
        (n_alias,) = _read(f, "<I")
        for _ in range(n_alias):
            alias, target = _string(f), _string(f)
            tensors[alias] = tensors[target]
    return tensors


_ATTN = {"self_attention": "self_attn", "attention": "encoder_attn"}
_LN = {"gamma": "weight", "beta": "bias"}


def ct2_whisper_to_hf(ct: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variables -> ``WhisperForConditionalGeneration`` state dict (fp32)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in ct.items():
        t = t.float()
        if name in ("encoder/conv1/weight", "encoder/conv1/bias", "encoder/conv2/weight", "encoder/conv2/bias"):
            out["model." + name.replace("/", ".")] = t
        elif name in ("encoder/position_encodings/encodings", "decoder/position_encodings/encodings"):
            out[f"model.{name.split('/')[0]}.embed_positions.weight"] = t
        elif name == "decoder/embeddings/weight":
            out["model.decoder.embed_tokens.weight"] = t
        elif name in ("decoder/projection/weight",):
            out["proj_out.weight"] = t
        elif m := re.fullmatch(r"(encoder|decoder)/layer_norm/(gamma|beta)", name):
            out[f"model.{m.group(1)}.layer_norm.{_LN[m.group(2)]}"] = t
        elif m := re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(.+)", name):
            _layer(out, f"model.{m.group(1)}.layers.{m.group(2)}", m.group(3), t)
        # anything else (e.g. CT2's own flags) carries no weights we use
    return out


def _layer(out: dict[str, torch.Tensor], pre: str, rest: str, t: torch.Tensor) -> None:
    if m := re.fullmatch(r"(self_attention|attention)/layer_norm/(gamma|beta)", rest):
        ln = "self_attn_layer_norm" if m.group(1) == "self_attention" else "encoder_attn_layer_norm"
        out[f"{pre}.{ln}.{_LN[m.group(2)]}"] = t
    elif m := re.fullmatch(r"ffn/layer_norm/(gamma|beta)", rest):
        out[f"{pre}.final_layer_norm.{_LN[m.group(1)]}"] = t
    elif m := re.fullmatch(r"ffn/linear_([01])/(weight|bias)", rest):
        out[f"{pre}.fc{int(m.group(1)) + 1}.{m.group(2)}"] = t
    elif m := re.fullmatch(r"self_attention/linear_0/(weight|bias)", rest):  # fused q, k, v
        q, k, v = t.chunk(3, dim=0)
        out[f"{pre}.self_attn.q_proj.{m.group(1)}"] = q
        out[f"{pre}.self_attn.v_proj.{m.group(1)}"] = v
        if m.group(1) == "weight":
            out[f"{pre}.self_attn.k_proj.weight"] = k  # the k bias is all zeros: Whisper has none
    elif m := re.fullmatch(r"self_attention/linear_1/(weight|bias)", rest):
        out[f"{pre}.self_attn.out_proj.{m.group(1)}"] = t
    elif m := re.fullmatch(r"attention/linear_0/(weight|bias)", rest):  # cross-attention q
        out[f"{pre}.encoder_attn.q_proj.{m.group(1)}"] = t
    elif m := re.fullmatch(r"attention/linear_1/(weight|bias)", rest):  # fused cross k, v
        k, v = t.chunk(2, dim=0)
        out[f"{pre}.encoder_attn.v_proj.{m.group(1)}"] = v
        if m.group(1) == "weight":
            out[f"{pre}.encoder_attn.k_proj.weight"] = k
    elif m := re.fullmatch(r"attention/linear_2/(weight|bias)", rest):
        out[f"{pre}.encoder_attn.out_proj.{m.group(1)}"] = t
    else:
        raise CheckpointError(f"unknown CTranslate2 Whisper variable .../{rest}")
