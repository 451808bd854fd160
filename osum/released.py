"""OSUM's released checkpoint (``infer.pt`` from ``ASLP-lab/OSUM``) as an :class:`OsumModel`.

The checkpoint is a plain state dict with OSUM's key prefixes and peft's LoRA wrapping
(``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``,
``...q_proj.lora_B.default.weight``); LoRA is merged at load time (``W + alpha / r * B @ A``)
and the unused ``speaker_head`` / ``ln_speech`` are dropped. The encoder's and adapter's
sizes are read off the tensors; the LLM's come from the Qwen2-7B-Instruct ``config.json``
given beside it (or fetched from the hub, for users who have it).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, QWEN2_7B, AdapterConfig, EncoderConfig, OsumConfig
from .errors import CheckpointError, ModelNotFoundError
from .loading import build_with_weights, load_tokenizer, merge_lora
from .model import OsumModel

__all__ = ["OSUM_HUB_ID", "QWEN_HUB_ID", "convert_osum_state_dict", "load_osum_checkpoint", "load_released"]

OSUM_HUB_ID = "ASLP-lab/OSUM"
QWEN_HUB_ID = "Qwen/Qwen2-7B-Instruct"
_OURS = ("encoder.", "down_sample_2.", "speech_transformer.", "speech_llama_proj.", "speech_token_emded.")
_UNUSED = ("speaker_head.", "ln_speech.")  # in the checkpoint, never used by OSUM's forward
_ALIASES = ("embed_tokens.weight", "lm_head.weight")  # top-level duplicates of the LLM's tables
_PEFT_PREFIX = "llama_model.base_model.model."
_LLM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps",
             "tie_word_embeddings", "bos_token_id", "eos_token_id")  # fmt: skip


def convert_osum_state_dict(sd: dict[str, torch.Tensor], lora_scale: float) -> dict[str, torch.Tensor]:
    """OSUM's key names -> ours, with LoRA merged; unknown keys are kept so that they are reported."""
    plain: dict[str, torch.Tensor] = {}
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_UNUSED) or k in _ALIASES:
            continue
        if k.startswith(_OURS):
            plain[k] = v
            continue
        if k.startswith(_PEFT_PREFIX):
            rest = k[len(_PEFT_PREFIX) :]
        elif k.startswith("llama_model."):  # a checkpoint saved without peft wrapping
            rest = k[len("llama_model.") :]
        else:
            plain[k] = v  # foreign: reported as unexpected
            continue
        m = re.fullmatch(r"(.+)\.lora_([AB])\.default\.weight", rest)
        if m:
            (lora_a if m.group(2) == "A" else lora_b)[f"llm.{m.group(1)}"] = v
        else:
            plain["llm." + rest.replace(".base_layer.", ".")] = v
    if set(lora_a) != set(lora_b):
        odd = sorted(set(lora_a) ^ set(lora_b))
        raise CheckpointError(f"LoRA A/B pairs incomplete for: {', '.join(odd[:8])}")
    return merge_lora(plain, {m: (lora_a[m], lora_b[m]) for m in lora_a}, lora_scale)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle errors, not a torch file at all
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]  # a raw DeepSpeed model-states file
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _config_from_checkpoint(sd: dict[str, torch.Tensor], llm_config: dict[str, Any]) -> OsumConfig:
    """Encoder/adapter sizes read off the tensors (Whisper's head size is 64; OSUM's adapter has 4 heads)."""
    try:
        d_enc, n_mels, _ = sd["encoder.embed.conv.0.weight"].shape
        n_ctx = sd["encoder.embed.pos_enc.pe"].shape[1]
        enc_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.encoders\.(\d+)\.", k)))
        enc_ffn = sd["encoder.encoders.0.feed_forward.w_1.weight"].shape[0]
        d_ada = sd["speech_transformer.embed.out.0.weight"].shape[0]
        ada_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"speech_transformer\.encoders\.(\d+)\.", k)))
        ada_ffn = sd["speech_transformer.encoders.0.feed_forward.w_1.weight"].shape[0]
        max_len = sd["speech_transformer.embed.pos_enc.pe"].shape[1]
        n_speech = sd["speech_token_emded.weight"].shape[0] - 2
    except (KeyError, ValueError):
        # not shaped like OSUM: take the released sizes, so that the key check below
        # names exactly what is missing and what is foreign
        return replace(PRESETS["osum"], llm=llm_config)
    return OsumConfig(
        name="osum",
        encoder=EncoderConfig(n_mels=n_mels, n_ctx=n_ctx, d_model=d_enc, n_heads=max(d_enc // 64, 1), n_layers=enc_layers, ffn_dim=enc_ffn),
        adapter=AdapterConfig(d_model=d_ada, n_heads=4, n_layers=ada_layers, ffn_dim=ada_ffn, max_len=max_len),
        llm=llm_config,
        speech_token_num=n_speech,
    )


def _llm_config(llm_dir: Path) -> dict[str, Any]:
    f = llm_dir / "config.json"
    if not f.is_file():
        raise ModelNotFoundError(f"{llm_dir}: no Qwen2 config.json (give the Qwen2-7B-Instruct config and tokenizer directory)")
    raw = json.loads(f.read_text())
    if raw.get("model_type") not in (None, "qwen2"):
        raise CheckpointError(f"{f}: model_type {raw.get('model_type')!r} is not qwen2")
    llm = {k: raw[k] for k in _LLM_KEYS if k in raw}
    for k, v in QWEN2_7B.items():
        llm.setdefault(k, v)
    if isinstance(llm["eos_token_id"], list):
        llm["eos_token_id"] = llm["eos_token_id"][0]
    return llm


def load_osum_checkpoint(checkpoint: str | Path, llm_dir: str | Path, device: str | torch.device = "cpu",
                         quantize: bool = False) -> OsumModel:  # fmt: skip
    """Load OSUM's released ``infer.pt`` with the Qwen2 config and tokenizer found in ``llm_dir``."""
    checkpoint, llm_dir = Path(checkpoint), Path(llm_dir)
    if not checkpoint.is_file():
        raise ModelNotFoundError(f"{checkpoint}: no such checkpoint")
    sd = _read_torch_file(checkpoint)
    cfg = _config_from_checkpoint(sd, _llm_config(llm_dir))
    model = build_with_weights(cfg, convert_osum_state_dict(sd, cfg.lora_scale), str(checkpoint))
    del sd  # the model holds what it needs: not the unconverted originals while place() moves it
    model.tokenizer = load_tokenizer(llm_dir)
    return model.place(device, quantize)


def load_released(local: Path, device: str | torch.device = "cpu", quantize: bool = False) -> OsumModel:
    """``infer.pt`` with its Qwen2 config and tokenizer from ``local``, else from the hub.

    Raises:
        ModelNotFoundError: not in ``local`` and the hub is unreachable (offline, no access).
    """
    if (local / "infer.pt").is_file():
        return load_osum_checkpoint(local / "infer.pt", local, device, quantize)
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        ckpt = hf_hub_download(OSUM_HUB_ID, "infer.pt")
        llm_dir = snapshot_download(QWEN_HUB_ID, allow_patterns=["config.json", "tokenizer*", "vocab.json", "merges.txt"])
    except Exception as e:  # offline, no hub access, or huggingface_hub missing
        raise ModelNotFoundError(
            f"the released OSUM model is not in {local} and the hub is unreachable ({type(e).__name__}). "
            f"Put infer.pt (from {OSUM_HUB_ID}) with the {QWEN_HUB_ID} config.json and tokenizer files in {local}, "
            "or pass --model /path/to/infer.pt"
        ) from e
    return load_osum_checkpoint(ckpt, llm_dir, device, quantize)
