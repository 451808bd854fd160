"""Word times for a transcript, from Whisper's own decoder (osum-mini's alternative to SRWT).

osum-mini was not trained on SRWT (no real speech here has reference word times), so it
cannot write OSUM's ``<0.00>`` time tags. Its encoder is Whisper base's, frozen, and Whisper
base's decoder ships in the prepared base (``whisper-base/``, the ASR baseline). That decoder
reads the final transcript teacher-forced over the encoder output the model computed anyway;
the cross-attention of Whisper's alignment heads (the heads whose attention follows the
speech, listed with the checkpoint) then says which 20 ms encoder frames each token looks at,
and dynamic time warping finds the monotonic path of the tokens through the frames. This is
the method of openai/whisper's ``timing.py``: attention normalised over tokens, a median
filter of 7 frames, the mean over heads, DTW on its negative.

Costs one decoder pass (~40 ms for a 4 s utterance on 2 CPU cores) and the DTW; the
decoder's weights are ~210 MB in fp32. Accuracy is measured by ``python -m
osum.train.eval_words`` on synthetic speech whose word boundaries are known
(docs/osum-mini.md); no real speech here has reference times.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .baseline import EN, EOT, NO_TIMESTAMPS, SOT, TRANSCRIBE
from .errors import UnsupportedTaskError
from .tasks import Word

__all__ = ["WordAligner", "dtw", "require_aligner", "word_times"]

FRAME_S = 0.02  # one encoder frame: Whisper's 50 Hz
MEDIAN_WIDTH = 7
# added to every word's (start, end): the path runs early against the reference (see
# osum.train.eval_words --calibrate, fitted on training prompts, never on the held-out ones)
SHIFTS = (0.09, 0.07)
_PUNCT = "\"'.,;:!?()[]{}-–—…¡¿"


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotonic path of least total cost through ``cost`` (N, M), from (0, 0) to (N-1, M-1),
    by steps of (1, 1), (1, 0) or (0, 1). -> the path's row and column indices.

    Cells on one anti-diagonal depend only on the two before it, so each is computed at once.
    """
    N, M = cost.shape
    D = np.full((N + 1, M + 1), np.inf)
    D[0, 0] = 0.0
    trace = np.zeros((N + 1, M + 1), np.int8)
    for k in range(2, N + M + 1):
        i = np.arange(max(1, k - M), min(N, k - 1) + 1)
        j = k - i
        steps = np.stack([D[i - 1, j - 1], D[i - 1, j], D[i, j - 1]])  # diagonal, down, right
        best = steps.argmin(0)
        D[i, j] = cost[i - 1, j - 1] + steps[best, np.arange(len(i))]
        trace[i, j] = best
    rows, cols = [], []
    i, j = N, M
    while i > 0 and j > 0:  # back from the end; only (0, 0) is finite on the borders, so it ends there
        rows.append(i - 1)
        cols.append(j - 1)
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def word_times(
    attention: torch.Tensor,
    word_of_token: list[int],
    n_frames: int,
    shifts: tuple[float, float] = (0.0, 0.0),
    duration: float | None = None,
) -> list[tuple[float, float]]:
    """Word spans in seconds from the alignment heads' cross-attention.

    Args:
        attention: (heads, R, frames) weights for R = 1 + tokens rows: the rows at the input
            positions that predict each text token (the first is ``<|notimestamps|>``'s) and
            the end token.
        word_of_token: for each text token, the index of its word (0, 1, ...), or -1 for a
            token that does not count (punctuation).
        n_frames: encoder frames of real audio (the rest is not looked at).
        shifts: seconds added to each start and end (then kept in order and within the audio).
        duration: seconds of audio (default: the frames'); no time is later.
    Returns:
        (start, end) per word (0 .. the largest index), in order, each at least a frame long
        where the audio allows.
    """
    w = attention[:, :, :n_frames].float()
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = (w - mean) / (std + 1e-6)
    if n_frames > MEDIAN_WIDTH // 2:
        padded = F.pad(w, (MEDIAN_WIDTH // 2, MEDIAN_WIDTH // 2), mode="reflect")
        w = padded.unfold(-1, MEDIAN_WIDTH, 1).median(-1).values
    matrix = w.mean(0)  # (R, frames)
    rows, cols = dtw(-matrix.double().numpy())
    n_tokens = len(word_of_token)
    first = np.full(n_tokens + 1, -1)
    last = np.full(n_tokens + 1, -1)
    for r, c in zip(rows, cols):  # the frames the path spends on each row
        first[r] = c if first[r] < 0 else first[r]
        last[r] = c
    spans: dict[int, list[float]] = {}
    for t, k in enumerate(word_of_token):
        if k < 0:
            continue
        start, end = float(first[t] * FRAME_S), float((last[t] + 1) * FRAME_S)
        if k in spans:
            spans[k][1] = end
        else:
            spans[k] = [start, end]
    limit = n_frames * FRAME_S if duration is None else min(duration, n_frames * FRAME_S)
    out: list[tuple[float, float]] = []
    prev = 0.0
    for k in range(max(word_of_token) + 1):
        s, e = (spans[k][0] + shifts[0], spans[k][1] + shifts[1]) if k in spans else (prev, prev)  # no token counted
        s = max(min(max(s, prev), limit - FRAME_S), 0.0)
        out.append((s, min(max(e, s + FRAME_S), limit)))  # at least a frame long
        prev = s
    if not out:
        return out
    # The path starts at the first frame and ends at the last, so the first and last words
    # take in the silence around the speech: at most twice the median word (as openai/whisper)
    longest = 2 * min(0.7, float(np.median([e - s for s, e in out])))
    if out[0][1] - out[0][0] > longest:
        out[0] = (out[0][1] - longest, out[0][1])
    if len(out) > 1 and out[-1][1] - out[-1][0] > longest:
        out[-1] = (out[-1][0], out[-1][0] + longest)
    return out


class WordAligner:
    """Whisper base's decoder, used only for the cross-attention of its alignment heads."""

    def __init__(self, decoder: Any, heads: list[tuple[int, int]], tokenizer: Any) -> None:
        self.decoder = decoder.eval()
        self.heads = heads
        self.tokenizer = tokenizer
        self.shifts = SHIFTS

    @classmethod
    def load(cls, path: str | Path) -> WordAligner | None:
        """From a Whisper directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
        and ``generation_config.json`` with ``alignment_heads``), decoder weights only; None
        where the heads are not listed (a base prepared before ``osum prepare`` wrote them)."""
        from safetensors import safe_open
        from tokenizers import Tokenizer
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperDecoder

        path = Path(path)
        gen = path / "generation_config.json"
        heads = json.loads(gen.read_text()).get("alignment_heads") if gen.is_file() else None
        if not heads:
            return None
        config = WhisperConfig.from_pretrained(str(path))
        config._attn_implementation = "eager"  # attention weights are what we need
        decoder = WhisperDecoder(config)
        prefix = "model.decoder."
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:  # the decoder's tensors only
            state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        decoder.load_state_dict(state)
        return cls(decoder, [tuple(h) for h in heads], Tokenizer.from_file(str(path / "tokenizer.json")))

    @torch.inference_mode()
    def align(self, encoded: torch.Tensor, transcript: str, duration: float | None = None) -> tuple[Word, ...]:
        """Times of the transcript's words (split at white space, as written), in seconds from
        the utterance's first sample.

        Args:
            encoded: (frames, d) one utterance's Whisper encoder output (50 Hz), its real frames only.
            transcript: the text to align; duration: seconds of audio (no time is later).
        """
        words = transcript.split()
        if not words or encoded.shape[0] == 0:
            return ()
        ids: list[int] = []
        word_of_token: list[int] = []
        for k, word in enumerate(words):
            piece = self.tokenizer.encode(" " + word, add_special_tokens=False).ids
            ids += piece
            # punctuation is read during the pause after a word: it does not set the word's end
            # (unless the "word" is all punctuation)
            spoken = [bool(self.tokenizer.decode([i]).strip().strip(_PUNCT)) for i in piece]
            word_of_token += [k if sp or not any(spoken) else -1 for sp in spoken]
        max_tokens = self.decoder.config.max_target_positions - 5
        if len(ids) > max_tokens:  # longer than Whisper's 448 positions: nothing sensible to align
            return ()
        weight = self.decoder.embed_tokens.weight
        seq = torch.tensor([[SOT, EN, TRANSCRIBE, NO_TIMESTAMPS, *ids, EOT]], device=weight.device)
        enc = encoded[None].to(weight.device, weight.dtype)
        out = self.decoder(input_ids=seq, encoder_hidden_states=enc, output_attentions=True, use_cache=False)
        # rows 3 .. -2: the positions of <|notimestamps|> and of every text token, each predicting the next
        att = torch.stack([out.cross_attentions[layer][0, head, 3:-1] for layer, head in self.heads]).cpu()
        n = int(encoded.shape[0])
        spans = word_times(att, word_of_token, n, self.shifts, duration)
        return tuple(Word(w, round(s, 3), round(e, 3)) for w, (s, e) in zip(words, spans))


def require_aligner(model: Any) -> WordAligner:
    """``model``'s word aligner; UnsupportedTaskError for a model that has none."""
    aligner = getattr(model, "aligner", None)
    if aligner is None:
        name = getattr(getattr(model, "cfg", None), "name", "this")
        raise UnsupportedTaskError(f"model {name!r} gives no word times (it has no word aligner)")
    return aligner
