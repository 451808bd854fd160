"""Write a checkpoint laid out exactly like OSUM's released ``infer.pt``, at tiny sizes.

Key names and layouts as the release has them: WeNet names for the encoder and
adapter, peft-wrapped LoRA (``base_layer`` / ``lora_A.default`` / ``lora_B.default``)
on q, k, v, o, gate and down projections, the unused ``speaker_head`` and ``ln_speech``,
the top-level ``embed_tokens`` / ``lm_head`` aliases, the 1500-row position table and
the 4099-row speech-token table. Also writes the Qwen2 config and tokenizer directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from osum.config import AdapterConfig, EncoderConfig, OsumConfig
from osum.loading import bundled_tokenizer_dir
from osum.model import OsumModel

LLM = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
)  # fmt: skip
# head size 64 in the encoder (as every Whisper), 4 adapter heads (as OSUM)
CFG = OsumConfig(
    name="osum",
    encoder=EncoderConfig(d_model=128, n_heads=2, n_layers=2, ffn_dim=256),
    adapter=AdapterConfig(d_model=64, n_heads=4, n_layers=2, ffn_dim=128),
    llm=LLM,
    speech_token_num=4097,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def write_release(root: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Path, OsumModel]:
    """Returns the directory (infer.pt + Qwen config + tokenizer) and the model it should load as."""
    torch.manual_seed(seed)
    expected = OsumModel(CFG).eval()
    with torch.no_grad():
        for p in expected.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    sd: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    for k, v in expected.state_dict().items():
        if not k.startswith("llm."):
            sd[k] = v.clone()
            continue
        rest = k[len("llm.") :]
        module, _, leaf = rest.rpartition(".")
        name = f"llama_model.base_model.model.{rest}"
        if module.rsplit(".", 1)[-1] in TARGETS:
            name = f"llama_model.base_model.model.{module}.base_layer.{leaf}"
            if leaf == "weight":
                a = torch.randn(8, v.shape[1]) * 0.1
                b = torch.randn(v.shape[0], 8) * 0.1
                sd[f"llama_model.base_model.model.{module}.lora_A.default.weight"] = a
                sd[f"llama_model.base_model.model.{module}.lora_B.default.weight"] = b
                merged[k] = v + 4.0 * (b @ a)  # alpha 32 / r 8
        sd[name] = v.clone()
    sd["embed_tokens.weight"] = sd["llama_model.base_model.model.model.embed_tokens.weight"]
    sd["lm_head.weight"] = sd["llama_model.base_model.model.lm_head.weight"]
    d = CFG.llm_dim
    sd |= {
        "speaker_head.weight": torch.randn(4097, d), "speaker_head.bias": torch.randn(4097),
        "ln_speech.weight": torch.ones(CFG.adapter.d_model), "ln_speech.bias": torch.zeros(CFG.adapter.d_model),
    }  # fmt: skip
    sd = {k: v.to(dtype) for k, v in sd.items()}
    expected.load_state_dict(expected.state_dict() | merged)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(sd, root / "infer.pt")
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **LLM}))
    for f in bundled_tokenizer_dir().iterdir():
        shutil.copy(f, root / f.name)
    return root, expected
