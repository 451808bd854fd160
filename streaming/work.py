"""Model work for streaming sessions: requests, results, and the batched functions that run them.

Sessions (sans-I/O) describe what they need as requests; the scheduler's worker runs
them on the one model, batching requests of different sessions, and hands the results
back. Three kinds, by priority:

* :class:`FinalRequest`: the whole utterance through the full-context encoder and a
  greedy decode (or the server's decoding options: beam search, OSUM's beam sampling):
  exactly :func:`osum.inference.recognize` with the ASR task and the same options.
* :class:`AnalysisRequest`: the utterance's tags by closed-set scoring, the Final's
  transcript teacher-forced after each task's prompt; all tasks of all requests in one
  batched pass. Tags the model does not support are ``unsupported``.
* :class:`PartialRequest`: new mel frames through the chunked encoder (the session's
  cache in, the new cache out), then the hypothesis: the committed tokens are forced, the
  previous unstable tail is the draft, verified in one forward pass; decoding continues
  only from the first token the model disagrees with. On CPU each partial runs on its
  session's LLM cache (only the new frames and the text are computed); on CUDA the batch's
  sessions run together (one verifying pass, then shared greedy steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from osum.audio import log_mel
from osum.decoding import DecodingOptions, generate, score_continuations
from osum.inference import slot_ids
from osum.model import OsumModel, SpeechStreamCache, stack_speech
from osum.tasks import LABELS, STTC_SEPARATOR, Word, get_task

from .drafts import budget, partial_on_cache, task_prompt, verify_and_decode, verify_and_decode_batch
from .events import UNSUPPORTED, Label

__all__ = [
    "PartialRequest", "PartialResult", "FinalRequest", "FinalResult", "AnalysisRequest", "AnalysisResult",
    "run_partials", "run_finals", "run_analyses", "TAG_TASKS",
]  # fmt: skip

# analysis kind -> the OSUM task whose prompt asks for it
TAG_TASKS = {"emotion": "ser", "style": "ssr", "events": "ved", "gender": "sgc", "age": "sap"}
_KIND = {"emotion": "emotion", "style": "style", "events": "event", "gender": "gender", "age": "age"}


@dataclass
class PartialRequest:
    mel: torch.Tensor  # (n_mels, t) new normalised frames, may be empty (chunked)
    cache: SpeechStreamCache | None  # the session's encoder cache (chunked; None: full context)
    speech: torch.Tensor  # (L, d_llm) speech embeddings so far
    committed: list[int]
    draft: list[int]  # the previous unstable tail
    final_chunk: bool = False
    max_new_tokens: int = 60
    # the LLM's keys and values for [prompt, speech-begin, the speech so far] from this
    # session's previous partial (None: compute them); extended in place, handed back
    llm_cache: Any = None
    # full context: the utterance so far (16 kHz float), encoded anew as a Final would be;
    # mel, cache, speech and llm_cache are then unused
    audio: np.ndarray | None = None


@dataclass
class PartialResult:
    cache: SpeechStreamCache | None
    speech: torch.Tensor
    tokens: list[int]  # committed + the new tail
    verified: int  # draft tokens accepted without decoding
    llm_cache: Any = None  # to give to the next partial (None after a batched pass)


@dataclass
class FinalRequest:
    audio: np.ndarray  # the utterance, 16 kHz float
    draft: list[int] = field(default_factory=list)  # the last partial hypothesis, to verify
    words: bool = False  # also the transcript's word times (the model's aligner)


@dataclass
class FinalResult:
    tokens: list[int]
    text: str
    confidence: float | None
    speech: torch.Tensor  # (L, d_llm) full-context embeddings, reused by the analysis
    words: tuple[Word, ...] = ()  # times in seconds from the utterance's first sample


@dataclass
class AnalysisRequest:
    speech: torch.Tensor
    transcript_ids: list[int]
    kinds: tuple[str, ...]
    chat: bool = False  # also write STTC's reply to the utterance
    max_reply_tokens: int = 120
    utterance_id: int = -1
    # called on the model's worker thread with the reply so far, after every token (streaming)
    on_reply: Callable[[str], None] | None = field(default=None, repr=False)


@dataclass
class AnalysisResult:
    tags: dict[str, Label] = field(default_factory=dict)
    reply: str | None = None


@torch.inference_mode()
def run_finals(model: OsumModel, reqs: list[FinalRequest], max_new_tokens: int = 200,
               decoding: DecodingOptions | None = None) -> list[FinalResult]:  # fmt: skip
    """The requests' final passes, each utterance encoded alone, as offline.

    ``decoding`` None: greedy, and a request's draft is verified in one pass and decoded only
    past it (greedy's result either way). Otherwise every request is decoded with those
    options (beam search, OSUM's beam sampling), alone, its draft unused: exactly
    :func:`osum.inference.recognize` with the ASR task and the same options. Either way a
    transcript has at most ``max_new_tokens`` tokens and the budget for its audio's length.
    """
    speech, speech_len, states = model.encode_each_with_states([log_mel(r.audio) for r in reqs])
    decoded: dict[int, tuple[list[int], list[float]]] = {}
    prompt = task_prompt(model, "asr")
    if decoding is not None:
        opts = replace(decoding, max_new_tokens=min(decoding.max_new_tokens, max_new_tokens))
        for b, r in enumerate(reqs):  # alone: a beam's search does not depend on its batch
            (h,) = generate(model.llm, model.splice([prompt], speech[b : b + 1], speech_len[b : b + 1]), opts,
                            model.cfg.eos_token_id, row_limits=[budget(r.audio.size / 16000, max_new_tokens)])  # fmt: skip
            decoded[b] = (h.tokens, h.token_logprobs)
    else:
        plain = [b for b, r in enumerate(reqs) if not r.draft]  # no draft: one batched greedy decode
        if plain:
            hyps = generate(model.llm, model.splice([prompt] * len(plain), speech[plain], speech_len[plain]),
                            DecodingOptions(max_new_tokens=max_new_tokens), model.cfg.eos_token_id,
                            row_limits=[budget(reqs[b].audio.size / 16000, max_new_tokens) for b in plain])  # fmt: skip
            decoded |= {b: (h.tokens, h.token_logprobs) for b, h in zip(plain, hyps)}
        for b, r in enumerate(reqs):  # with a draft: verify it in one pass, decode only past it
            if r.draft:
                tokens, lps, _ = verify_and_decode(model, speech[b, : int(speech_len[b])], [], r.draft,
                                                   budget(r.audio.size / 16000, max_new_tokens))  # fmt: skip
                decoded[b] = (tokens, lps)
    out = []
    for b in range(len(reqs)):
        tokens, lps = decoded[b]
        conf = float(np.exp(np.mean(lps))) if lps else None
        text = model.tokenizer.decode(tokens).strip()
        words = model.aligner.align(states[b], text, reqs[b].audio.size / 16000) if reqs[b].words and model.aligner else ()
        out.append(FinalResult(tokens, text, conf, speech[b, : int(speech_len[b])], words))
    return out


@torch.inference_mode()
def run_analyses(model: OsumModel, reqs: list[AnalysisRequest]) -> list[AnalysisResult]:
    supported = model.cfg.supported_tasks
    results = [AnalysisResult() for _ in reqs]
    rows: list[tuple[int, str]] = []  # (request, kind) pairs to score
    for i, r in enumerate(reqs):
        for kind in r.kinds:
            task = TAG_TASKS[kind]
            if supported is not None and task not in supported:
                results[i].tags[kind] = Label(UNSUPPORTED)
            else:
                rows.append((i, kind))
    _replies(model, reqs, results)
    if not rows:
        return results
    eos = model.cfg.eos_token_id
    batch, lengths = stack_speech([reqs[i].speech for i, _ in rows])
    prompts = [task_prompt(model, TAG_TASKS[k]) for _, k in rows]
    inputs = model.splice(prompts, batch, lengths, [reqs[i].transcript_ids for i, _ in rows])
    cands = []
    for _, kind in rows:
        task = get_task(TAG_TASKS[kind])
        cands.append([slot_ids(model.tokenizer, task, 0, lab) + [eos] for lab in LABELS[_KIND[kind]]])
    scores = score_continuations(model.llm, inputs, cands)
    for (i, kind), logps in zip(rows, scores):
        probs = torch.tensor(logps).softmax(-1).tolist()
        dist = dict(zip(LABELS[_KIND[kind]], probs))
        best = max(dist, key=dist.__getitem__)
        results[i].tags[kind] = Label(best, dist[best], dist)
    return results


def _replies(model: OsumModel, reqs: list[AnalysisRequest], results: list[AnalysisResult]) -> None:
    """STTC: ``[prompt, speech, transcript <开始回答>]`` then the model's answer, greedy, batched."""
    chat = [i for i, r in enumerate(reqs) if r.chat]
    if not chat:
        return
    if model.cfg.supported_tasks is not None and "sttc" not in model.cfg.supported_tasks:
        for i in chat:
            results[i].tags["chat"] = Label(UNSUPPORTED)
        return
    sep = model.tokenizer.encode(STTC_SEPARATOR, add_special_tokens=False)
    batch, lengths = stack_speech([reqs[i].speech for i in chat])
    inputs = model.splice([task_prompt(model, "sttc")] * len(chat), batch, lengths, [reqs[i].transcript_ids + sep for i in chat])
    opts = DecodingOptions(max_new_tokens=max(reqs[i].max_reply_tokens for i in chat))
    streams = [(j, reqs[i].on_reply) for j, i in enumerate(chat) if reqs[i].on_reply is not None]
    grown = [0] * len(chat)

    def step(hyps: list) -> None:  # type: ignore[type-arg]
        for j, callback in streams:
            if len(hyps[j].tokens) > grown[j]:
                grown[j] = len(hyps[j].tokens)
                callback(model.tokenizer.decode(hyps[j].tokens).lstrip())

    for i, h in zip(chat, generate(model.llm, inputs, opts, model.cfg.eos_token_id, step if streams else None)):
        results[i].reply = model.tokenizer.decode(h.tokens).strip()


@torch.inference_mode()
def run_partials(model: OsumModel, reqs: list[PartialRequest]) -> list[PartialResult]:
    """The sessions' new chunks through the chunked encoder in one batch (each row on its
    own cache and offset), then each session's hypothesis: on its own LLM cache (CPU, or a
    lone partial) or all in one batched LLM pass (CUDA). Full-context requests (``audio``
    set) go to :func:`_full_partials`."""
    full = [b for b, r in enumerate(reqs) if r.audio is not None]
    if full:
        done = dict(zip(full, _full_partials(model, [reqs[b] for b in full])))
        rest = [b for b in range(len(reqs)) if b not in done]
        done |= dict(zip(rest, run_partials(model, [reqs[b] for b in rest]) if rest else []))
        return [done[b] for b in range(len(reqs))]
    encoded = _encode_chunks(model, reqs)
    chunks = [(torch.cat([r.speech, new[0]]) if r.speech.numel() else new[0], cache) for r, (new, cache) in zip(reqs, encoded)]
    out = [PartialResult(cache, speech, list(r.committed), 0) for r, (speech, cache) in zip(reqs, chunks)]
    rows = [b for b, (speech, _) in enumerate(chunks) if speech.shape[0] > 0]  # no speech frames yet: nothing to decode
    limits = {b: _token_limit(reqs[b], chunks[b][0]) for b in rows}
    # One by one on each session's LLM cache (only new frames and text computed), or all in one
    # batch from scratch (the caches cannot be stacked cheaply). On CPU the prefill dominates
    # (int8 osum-mini: ~350 ms for a 5 s utterance's prefix, ~100 ms for a partial's new part,
    # while a 4-row decoding step costs about a 1-row one): reuse wins. On CUDA, batch.
    if len(rows) == 1 or (rows and model.device.type == "cpu"):
        for b in rows:
            r, speech = reqs[b], chunks[b][0]
            new = speech[r.speech.shape[0] :] if r.llm_cache is not None else speech
            tokens, verified, kv = partial_on_cache(model, new, r.llm_cache, r.committed, r.draft, limits[b])
            out[b].tokens, out[b].verified, out[b].llm_cache = tokens, verified, kv
    elif rows:
        decoded = verify_and_decode_batch(model, [chunks[b][0] for b in rows], [reqs[b].committed for b in rows],
                                          [reqs[b].draft for b in rows], [limits[b] for b in rows])  # fmt: skip
        for b, (tokens, _, verified) in zip(rows, decoded):
            out[b].tokens, out[b].verified = tokens, verified
    return out


def _token_limit(req: PartialRequest, speech: torch.Tensor) -> int:
    """A partial's token budget for its (L, d_llm) speech frames, which run at 12.5 Hz (whisper's
    50 Hz / 4); committed tokens are never cut."""
    return max(len(req.committed), budget(speech.shape[0] / 12.5, req.max_new_tokens))


def _full_partials(model: OsumModel, reqs: list[PartialRequest]) -> list[PartialResult]:
    """Partials on the utterance so far with the full-context encoder (each alone, as a Final),
    then the committed tokens forced and the previous tail verified as a draft: one by one on
    CPU (the prefill dominates and a padded batch would cost each row the longest's), batched
    on CUDA. Nothing is cached between partials: the frames change as the audio grows."""
    assert all(r.audio is not None for r in reqs)
    speech, lengths = model.encode_each([log_mel(r.audio) for r in reqs])  # type: ignore[arg-type]
    rows = [speech[b, : int(lengths[b])] for b in range(len(reqs))]
    limits = [_token_limit(r, x) for r, x in zip(reqs, rows)]
    out = [PartialResult(None, x, list(r.committed), 0) for r, x in zip(reqs, rows)]
    live = [b for b, x in enumerate(rows) if x.shape[0] > 0]
    if len(live) > 1 and model.device.type != "cpu":
        decoded = verify_and_decode_batch(model, [rows[b] for b in live], [reqs[b].committed for b in live],
                                          [reqs[b].draft for b in live], [limits[b] for b in live])  # fmt: skip
    else:
        decoded = [verify_and_decode(model, rows[b], reqs[b].committed, reqs[b].draft, limits[b]) for b in live]
    for b, (tokens, _, verified) in zip(live, decoded):
        out[b].tokens, out[b].verified = tokens, verified
    return out


def _encode_chunks(model: OsumModel, reqs: list[PartialRequest]) -> list[tuple[torch.Tensor, SpeechStreamCache]]:
    """Each request's new mel frames through the chunked encoder: one batch per encoder
    chunking (sessions may configure their own chunk size and left context)."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault((r.cache.encoder.chunk_size, r.cache.encoder.left_chunks, r.cache.adapter.left_context), []).append(i)
    out: list[Any] = [None] * len(reqs)
    for rows in groups.values():
        done = model.encode_chunks([reqs[i].mel[None] for i in rows], [reqs[i].cache for i in rows],
                                   [reqs[i].final_chunk for i in rows])  # fmt: skip
        for i, res in zip(rows, done):
            out[i] = res
    return out
