"""Whisper base's own encoder-decoder: the ASR baseline osum-mini is measured against.

Loaded from ``<cache>/osum-mini/whisper-base`` (written by ``osum prepare osum-mini``),
run as faster-whisper would: Whisper's feature extractor (padded to 30 s), the prompt
``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` and greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["WhisperBaseline"]

SOT, EN, TRANSCRIBE, NO_TIMESTAMPS, EOT = 50258, 50259, 50359, 50363, 50257


class WhisperBaseline:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

        path = Path(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(str(path)).eval()
        self.features = WhisperFeatureExtractor(feature_size=80)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    def transcribe(self, audios: list[np.ndarray], max_new_tokens: int = 200) -> list[str]:
        """16 kHz float audio (each <= 30 s) -> English transcripts, greedy."""
        return [self.tokenizer.decode(ids).strip() for ids in self.decode_ids(audios, max_new_tokens)]

    @torch.inference_mode()
    def decode_ids(self, audios: list[np.ndarray], max_new_tokens: int = 200) -> list[list[int]]:
        """Greedy token ids after the prompt, without the end token.

        Our own loop: transformers' ``generate`` treats forced ``decoder_input_ids`` as a
        prompt to strip and drops the start of the transcript.
        """
        from transformers import DynamicCache, EncoderDecoderCache

        feats = self.features(audios, sampling_rate=16000, return_tensors="pt").input_features
        enc = self.model.model.encoder(feats).last_hidden_state
        B = len(audios)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step = torch.tensor([[SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]] * B)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(max_new_tokens):
            logits = self.model(encoder_outputs=(enc,), decoder_input_ids=step, cache=cache, use_cache=True).logits
            tok = logits[:, -1].argmax(-1)
            for b in range(B):
                if not done[b]:
                    if int(tok[b]) == EOT:
                        done[b] = True
                    else:
                        out[b].append(int(tok[b]))
            if all(done):
                break
            step = tok[:, None]
        return out
