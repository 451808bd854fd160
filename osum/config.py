"""Model dimensions and the named sizes (``osum``, ``osum-mini``, ``tiny``).

A model directory holds ``config.json`` (this :class:`OsumConfig` as JSON, with the
Qwen2 config nested under ``llm``), ``model.safetensors`` and the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidConfigError

__all__ = ["PRESETS", "QWEN2_7B", "QWEN25_05B", "AdapterConfig", "EncoderConfig", "OsumConfig"]


@dataclass(frozen=True)
class EncoderConfig:
    """Whisper encoder (OSUM: Whisper-medium as a WeNet TransformerEncoder)."""

    n_mels: int = 80
    n_ctx: int = 1500  # positions at 50 Hz = 30 s
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 24
    ffn_dim: int = 4096

    def __post_init__(self) -> None:
        _check_heads("encoder", self.d_model, self.n_heads)


@dataclass(frozen=True)
class AdapterConfig:
    """OSUM's "gxl" adapter: 3 causal convs (strides 1, 2, 2), a 4-layer transformer, a projection."""

    d_model: int = 1024
    n_heads: int = 4
    n_layers: int = 4
    ffn_dim: int = 2560
    max_len: int = 5000  # WeNet abs_pos table length

    def __post_init__(self) -> None:
        _check_heads("adapter", self.d_model, self.n_heads)


def _check_heads(where: str, d: int, h: int) -> None:
    if d <= 0 or h <= 0 or d % h:
        raise InvalidConfigError(f"{where}: d_model {d} must be a positive multiple of n_heads {h}")


# Qwen2 configs as dicts (transformers.Qwen2Config keyword arguments).
QWEN2_7B: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151643,
)  # fmt: skip
QWEN25_05B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151643,
)  # fmt: skip


@dataclass(frozen=True)
class OsumConfig:
    """Everything needed to build an OSUM model (weights come separately)."""

    name: str = "osum"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: dict[str, Any] = field(default_factory=lambda: dict(QWEN2_7B))
    # speech boundary embeddings: rows speech_token_num (begin) and speech_token_num + 1 (end)
    # of ``speech_token_emded``; OSUM sizes the table 4099 because it once held speech tokens.
    speech_token_num: int = 4097
    eos_token_id: int = 151643  # <|endoftext|>, OSUM's stop token
    # LoRA as OSUM trains it (merged into the weights when a checkpoint is loaded)
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
    # tasks this model was trained and measured on; others are reported "unsupported"
    supported_tasks: tuple[str, ...] | None = None
    # the longest utterance (s) these weights were measured to transcribe well (None: Whisper's
    # window); the streaming engine splits longer ones (from the weights' card, docs/osum-mini.md)
    max_utterance_s: float | None = None
    # the LLM's dtype on CPU (on CUDA it is always bf16). bf16 halves memory, but CPUs without
    # AVX512-BF16 or AMX run bf16 matmuls ~100x slower than fp32 (measured on an AVX2 EPYC)
    cpu_llm_dtype: str = "float32"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if key not in self.llm:
                raise InvalidConfigError(f"llm config lacks {key!r}")
        if self.speech_token_num < 0:
            raise InvalidConfigError("speech_token_num must be >= 0")
        if self.max_utterance_s is not None and not 1.0 <= self.max_utterance_s <= 29.0:
            raise InvalidConfigError(f"max_utterance_s must be in [1, 29], got {self.max_utterance_s}")

    @property
    def llm_dim(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        if self.supported_tasks is not None:
            d["supported_tasks"] = list(self.supported_tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OsumConfig:
        try:
            d = dict(d)
            enc = EncoderConfig(**d.pop("encoder", {}))
            ada = AdapterConfig(**d.pop("adapter", {}))
            if "lora_targets" in d:
                d["lora_targets"] = tuple(d["lora_targets"])
            if d.get("supported_tasks") is not None:
                d["supported_tasks"] = tuple(d["supported_tasks"])
            return cls(encoder=enc, adapter=ada, **d)
        except TypeError as e:
            raise InvalidConfigError(f"bad model config: {e}") from e

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> OsumConfig:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidConfigError(f"{path}: unreadable model config ({e})") from e


PRESETS: dict[str, OsumConfig] = {
    # the paper's released model: Whisper-medium + Qwen2-7B(-Instruct)
    "osum": OsumConfig(name="osum"),
    # the embedded default: Whisper-base + Qwen2.5-0.5B (weights: `osum prepare osum-mini`)
    "osum-mini": OsumConfig(
        name="osum-mini",
        encoder=EncoderConfig(d_model=512, n_heads=8, n_layers=6, ffn_dim=2048),
        adapter=AdapterConfig(d_model=512, n_heads=4, n_layers=2, ffn_dim=1536),
        llm=dict(QWEN25_05B),
        speech_token_num=0,
    ),
    # random weights at toy sizes for fast tests; vocabulary of the real Qwen tokenizer
    "tiny": OsumConfig(
        name="tiny",
        encoder=EncoderConfig(d_model=64, n_heads=4, n_layers=2, ffn_dim=128),
        adapter=AdapterConfig(d_model=64, n_heads=4, n_layers=2, ffn_dim=128),
        llm=dict(
            vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=151643, eos_token_id=151643,
        ),  # fmt: skip
        speech_token_num=0,
    ),
}
