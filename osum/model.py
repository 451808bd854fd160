"""The OSUM model: Whisper encoder -> adapter -> projection -> Qwen2 with speech spliced in.

Submodule names are the top-level key prefixes of OSUM's checkpoint (``encoder``,
``down_sample_2``, ``speech_transformer``, ``speech_llama_proj``, and the boundary
table ``speech_token_emded``, misspelt as in the original), except the LLM, which is
transformers' ``Qwen2ForCausalLM`` under ``llm`` with LoRA already merged.

The model holds weights only. Streaming state (:class:`SpeechStreamCache`) goes in
and comes back out of :meth:`OsumModel.encode_chunk`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .adapter import AdapterCache, CausalConvSubsampling4, SpeechTransformer, subsampled_length
from .config import OsumConfig
from .encoder import EncoderCache, WhisperEncoder
from .errors import InvalidConfigError

__all__ = ["OsumModel", "SpeechStreamCache", "SplicedInputs", "build_llm", "stack_speech"]


def stack_speech(speech: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterances' speech embeddings (L_i, d) -> right-padded (B, max L, d) and (B,) lengths."""
    batch = speech[0].new_zeros(len(speech), max(x.shape[0] for x in speech), speech[0].shape[-1])
    for j, x in enumerate(speech):
        batch[j, : x.shape[0]] = x
    return batch, torch.tensor([x.shape[0] for x in speech])


def build_llm(cfg: OsumConfig) -> nn.Module:
    """transformers' Qwen2ForCausalLM at the configured size (weights uninitialised if on meta)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm_cfg = Qwen2Config(**cfg.llm)
    llm_cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(llm_cfg)


@dataclass
class SpeechStreamCache:
    """One stream's encoder + adapter state (device tensors; never serialised)."""

    encoder: EncoderCache
    adapter: AdapterCache

    def nbytes(self) -> int:
        return self.encoder.nbytes() + self.adapter.nbytes()


@dataclass
class SplicedInputs:
    """LLM inputs for a batch, left-padded: [pad, prompt, speech-begin, speech, speech-end, text]."""

    embeds: torch.Tensor  # (B, S, d_llm)
    attention_mask: torch.Tensor  # (B, S), 1 on real positions
    position_ids: torch.Tensor  # (B, S), 0 at each row's first real position


class OsumModel(nn.Module):
    def __init__(self, cfg: OsumConfig, llm: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        enc, ada = cfg.encoder, cfg.adapter
        self.encoder = WhisperEncoder(enc)
        self.down_sample_2 = CausalConvSubsampling4(enc.d_model, ada.d_model)
        self.speech_transformer = SpeechTransformer(ada)
        self.speech_llama_proj = nn.Linear(ada.d_model, cfg.llm_dim)
        self.speech_token_emded = nn.Embedding(cfg.speech_token_num + 2, cfg.llm_dim)
        self.llm = llm if llm is not None else build_llm(cfg)
        self.tokenizer: Any = None  # set by osum.loading
        # trained osum-mini weights: their model card (source, measured results; osum/train/export.py)
        self.card: dict | None = None
        self.quantized: str | None = None  # "int8" after quantize_llm()
        # word times for transcripts (osum.timing): Whisper's decoder over this encoder's output,
        # where the encoder is Whisper's own (osum-mini); None: the model gives no word times
        self.aligner: Any = None

    # ---- devices and dtypes ----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.speech_llama_proj.weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def place(self, device: str | torch.device, quantize: bool = False) -> OsumModel:
        """Move to ``device``: encoder and adapter in fp32 (as OSUM); the LLM in bf16 on CUDA and in
        ``cfg.cpu_llm_dtype`` on CPU, or with int8 linear layers (``quantize``, CPU only)."""
        device = torch.device(device)
        if self.aligner is not None:
            self.aligner.decoder.to(device=device, dtype=torch.float32)
        for name, child in self.named_children():
            if name != "llm":
                child.to(device=device, dtype=torch.float32)
        if quantize:
            self.llm.to(device=device)
            return self.quantize_llm().eval()
        cpu_dtype = getattr(torch, self.cfg.cpu_llm_dtype)
        self.llm.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else cpu_dtype)
        return self.eval()

    def quantize_llm(self) -> OsumModel:
        """int8 for the LLM's linear layers on CPU (:mod:`osum.int8`: fbgemm's kernel, weights
        int8 with a scale per output channel, activations int8 with a scale per token, so a
        token's result never depends on the rest of its batch). Decoding is memory-bound on
        CPU, so this is ~3x faster per step and ~4x smaller for those layers (osum-mini,
        2 cores: 130 -> ~40 ms a step; docs/osum-mini.md). The embedding table stays fp32.
        Layer by layer, so a bf16 LLM never exists in fp32 all at once. Results differ
        slightly from the unquantised model: measure before relying on it. Attention becomes
        :mod:`osum.attention`'s ``"osum_rows"``, so that a streamed Final's verified draft
        gives what decoding token by token gives, bit for bit (int8 turns last bits into flips).
        """
        if self.device.type != "cpu":
            raise InvalidConfigError("int8 quantisation is for CPU; on CUDA the LLM runs in bf16")
        from .attention import use_row_attention
        from .int8 import TokenInt8Linear, quantize_linears

        llm = self.llm
        use_row_attention(llm)
        for layer in llm.model.layers:
            quantize_linears(layer.float())
        # the output layer before the embedding table: never both in fp32 at once (0.27 GB of the peak)
        llm.lm_head = TokenInt8Linear(llm.lm_head.float())
        for part in (llm.model.embed_tokens, llm.model.norm, llm.model.rotary_emb):
            part.float()
        self.quantized = "int8"
        _malloc_trim()  # hand the freed float weights back to the OS (glibc keeps them otherwise)
        return self

    # ---- speech -> LLM embeddings ----------------------------------------------------

    def encode_speech(
        self,
        mel: torch.Tensor,
        lengths: torch.Tensor | None = None,
        chunk_size: int | None = None,
        left_chunks: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-context encoding of whole utterances (what offline OSUM does).

        Args:
            mel: (B, n_mels, T) right-padded OSUM log-mel; lengths: (B,) valid frames.
            chunk_size, left_chunks: apply the block-causal masks that :meth:`encode_chunk`
                implies instead of full attention (the offline reference for streaming).
        Returns:
            speech embeddings (B, L, d_llm) at 12.5 Hz and their (B,) lengths.
        """
        mel = mel.to(self.device, torch.float32)
        x, enc_len = self.encoder(mel, lengths, chunk_size, left_chunks)
        return self.adapt(x, enc_len, chunk_size, left_chunks)

    def adapt(
        self, x: torch.Tensor, enc_len: torch.Tensor, chunk_size: int | None = None, left_chunks: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper encoder output (B, T, d_enc) at 50 Hz and its (B,) lengths -> speech
        embeddings (B, L, d_llm) at 12.5 Hz and their lengths (the adapter of :meth:`encode_speech`)."""
        x = self.down_sample_2(x)
        lengths = subsampled_length(enc_len)
        block = None if chunk_size is None else chunk_size // 4
        x = self.speech_transformer(x, lengths, block, left_chunks)
        return self.speech_llama_proj(x), lengths

    def encode_each(self, mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_speech` of each utterance's log-mel (n_mels, T_i) alone, stacked
        right-padded: (B, max L, d_llm) and (B,) lengths.

        A padded batch changes the encoder's arithmetic in the last bits (its matrix products
        take other shapes), and with the int8 LLM last bits can change words. Alone, each
        utterance gets what it gets in any batch: a streamed Final equals offline recognition,
        and one session's result never depends on what else was batched with it.
        """
        return self.encode_each_with_states(mels)[:2]

    def encode_each_with_states(self, mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode_each`, and each utterance's Whisper encoder output (T_i, d_enc): what
        the word aligner (:mod:`osum.timing`) reads."""
        speech, states = [], []
        for m in mels:
            x, enc_len = self.encoder(m[None].to(self.device, torch.float32))
            speech.append(self.adapt(x, enc_len)[0][0])
            states.append(x[0])
        return *stack_speech(speech), states

    def init_stream(self, chunk_size: int = 20, left_chunks: int = -1) -> SpeechStreamCache:
        """A new stream's cache. ``chunk_size`` counts encoder frames (50 Hz); a multiple of 4."""
        if chunk_size % 4:
            raise InvalidConfigError(f"chunk_size must be a multiple of 4 encoder frames, got {chunk_size}")
        left = -1 if left_chunks < 0 else left_chunks * chunk_size // 4
        return SpeechStreamCache(self.encoder.init_cache(chunk_size, left_chunks), AdapterCache(left_context=left))

    def encode_chunk(
        self, mel: torch.Tensor, cache: SpeechStreamCache, final: bool = False
    ) -> tuple[torch.Tensor, SpeechStreamCache]:
        """Chunked encoding for a stream. mel: (B, n_mels, t) new frames -> new embeddings (B, k, d_llm).

        Each whole encoder chunk gives ``chunk_size / 4`` speech embeddings that attend to
        themselves and earlier chunks only (see :mod:`osum.encoder`).
        """
        return self.encode_chunks([mel], [cache], [final])[0]

    def encode_chunks(
        self, mels: list[torch.Tensor], caches: list[SpeechStreamCache], finals: list[bool]
    ) -> list[tuple[torch.Tensor, SpeechStreamCache]]:
        """:meth:`encode_chunk` for several streams in one batch: mels[r] (1, n_mels, t_r) the
        new frames of stream r, each on its own cache (one stream alone may have several
        rows). -> per stream (1, k_r, d_llm) and its new cache, as it gets alone (up to rounding)."""
        enc = self.encoder.forward_chunks([m.to(self.device, torch.float32) for m in mels], [c.encoder for c in caches], finals)
        xs, adas = [], []
        for (x, _), c in zip(enc, caches):
            x, conv_state = self.down_sample_2.forward_chunk(x, c.adapter.conv)
            xs.append(x)
            adas.append(replace(c.adapter, conv=conv_state))
        block = caches[0].encoder.chunk_size // 4 if caches else 1  # one encoder chunk = one adapter block
        out = self.speech_transformer.forward_chunks(xs, adas, block)
        return [(self.speech_llama_proj(y), SpeechStreamCache(e, a)) for (y, a), (_, e) in zip(out, enc)]

    # ---- the splice -------------------------------------------------------------------

    def boundary_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned speech-begin and speech-end vectors, each (d_llm,)."""
        w = self.speech_token_emded.weight
        n = self.cfg.speech_token_num
        return w[n], w[n + 1]

    def splice(
        self,
        prompt_ids: list[list[int]],
        speech: torch.Tensor,
        speech_lengths: torch.Tensor,
        text_ids: list[list[int]] | None = None,
    ) -> SplicedInputs:
        """Build ``[prompt tokens, speech-begin, speech frames, speech-end, text tokens]`` per row.

        No chat template, no BOS: exactly OSUM's ``generate()`` input. Rows are left-padded
        so that every row's next token is predicted at the last position.
        """
        B = speech.shape[0]
        if len(prompt_ids) != B or (text_ids is not None and len(text_ids) != B):
            raise ValueError("one prompt (and text) per utterance")
        dev, dt = self.device, self.llm_dtype
        table = self.llm.get_input_embeddings()
        begin, end = (e.to(dt) for e in self.boundary_embeddings())
        rows = []
        for b in range(B):
            ids = torch.tensor(prompt_ids[b], dtype=torch.long, device=dev)
            parts = [table(ids), begin[None], speech[b, : int(speech_lengths[b])].to(dt), end[None]]
            if text_ids is not None and text_ids[b]:
                parts.append(table(torch.tensor(text_ids[b], dtype=torch.long, device=dev)))
            rows.append(torch.cat(parts))
        S = max(r.shape[0] for r in rows)
        embeds = torch.zeros(B, S, self.cfg.llm_dim, dtype=dt, device=dev)
        mask = torch.zeros(B, S, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            embeds[b, S - r.shape[0] :] = r
            mask[b, S - r.shape[0] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return SplicedInputs(embeds, mask, positions)


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
