"""Model work for streaming sessions: requests, results, and the batched functions that run them.

Sessions (sans-I/O) describe what they need as requests; the scheduler's worker runs
them on the one model, batching requests of different sessions, and hands the results
back. Three kinds, by priority:

* :class:`FinalRequest`: the whole utterance through the full-context encoder and a
  greedy decode: exactly :func:`osum.inference.recognize` with the ASR task.
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from osum.audio import log_mel
from osum.attention import rows_singly_from
from osum.decoding import DecodingOptions, _new_cache, _step, first_loop_cut, generate, loop_cut, score_continuations
from osum.inference import slot_ids
from osum.model import OsumModel, SpeechStreamCache
from osum.tasks import LABELS, STTC_SEPARATOR, get_task

from .events import UNSUPPORTED, Label

__all__ = [
    "PartialRequest", "PartialResult", "FinalRequest", "FinalResult", "AnalysisRequest", "AnalysisResult",
    "run_partials", "run_finals", "run_analyses", "verify_and_decode", "verify_and_decode_batch", "TAG_TASKS",
]  # fmt: skip

# analysis kind -> the OSUM task whose prompt asks for it
TAG_TASKS = {"emotion": "ser", "style": "ssr", "events": "ved", "gender": "sgc", "age": "sap"}
_KIND = {"emotion": "emotion", "style": "style", "events": "event", "gender": "gender", "age": "age"}


@dataclass
class PartialRequest:
    mel: torch.Tensor  # (n_mels, t) new normalised frames, may be empty
    cache: SpeechStreamCache
    speech: torch.Tensor  # (L, d_llm) speech embeddings so far
    committed: list[int]
    draft: list[int]  # the previous unstable tail
    final_chunk: bool = False
    max_new_tokens: int = 60
    # the LLM's keys and values for [prompt, speech-begin, the speech so far] from this
    # session's previous partial (None: compute them); extended in place, handed back
    llm_cache: Any = None


@dataclass
class PartialResult:
    cache: SpeechStreamCache
    speech: torch.Tensor
    tokens: list[int]  # committed + the new tail
    verified: int  # draft tokens accepted without decoding
    llm_cache: Any = None  # to give to the next partial (None after a batched pass)


@dataclass
class FinalRequest:
    audio: np.ndarray  # the utterance, 16 kHz float
    draft: list[int] = field(default_factory=list)  # the last partial hypothesis, to verify


@dataclass
class FinalResult:
    tokens: list[int]
    text: str
    confidence: float | None
    speech: torch.Tensor  # (L, d_llm) full-context embeddings, reused by the analysis


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


def _stack(speech: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterances' speech embeddings (L_i, d) -> right-padded (B, max L, d) and (B,) lengths."""
    batch = speech[0].new_zeros(len(speech), max(x.shape[0] for x in speech), speech[0].shape[-1])
    for j, x in enumerate(speech):
        batch[j, : x.shape[0]] = x
    return batch, torch.tensor([x.shape[0] for x in speech])


def _budget(seconds: float, limit: int) -> int:
    """ASR's token budget for ``seconds`` of speech (as offline recognition uses), within ``limit``."""
    return min(limit, get_task("asr").token_budget(seconds) or limit)


def _prompt(model: OsumModel, task: str) -> list[int]:
    return model.tokenizer.encode(get_task(task).prompt, add_special_tokens=False)


@torch.inference_mode()
def run_finals(model: OsumModel, reqs: list[FinalRequest], max_new_tokens: int = 200) -> list[FinalResult]:
    speech, speech_len = model.encode_each([log_mel(r.audio) for r in reqs])  # each alone, as offline
    plain = [b for b, r in enumerate(reqs) if not r.draft]  # no draft: one batched greedy decode
    decoded: dict[int, tuple[list[int], list[float]]] = {}
    if plain:
        prompt = _prompt(model, "asr")
        sub = speech[plain]
        hyps = generate(model.llm, model.splice([prompt] * len(plain), sub, speech_len[plain]),
                        DecodingOptions(max_new_tokens=max_new_tokens), model.cfg.eos_token_id,
                        row_limits=[_budget(reqs[b].audio.size / 16000, max_new_tokens) for b in plain])  # fmt: skip
        decoded |= {b: (h.tokens, h.token_logprobs) for b, h in zip(plain, hyps)}
    for b, r in enumerate(reqs):  # with a draft: verify it in one pass, decode only past it
        if r.draft:
            tokens, lps, _ = verify_and_decode(model, speech[b, : int(speech_len[b])], [], r.draft,
                                               _budget(r.audio.size / 16000, max_new_tokens))  # fmt: skip
            decoded[b] = (tokens, lps)
    out = []
    for b in range(len(reqs)):
        tokens, lps = decoded[b]
        conf = float(np.exp(np.mean(lps))) if lps else None
        text = model.tokenizer.decode(tokens).strip()
        out.append(FinalResult(tokens, text, conf, speech[b, : int(speech_len[b])]))
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
    batch, lengths = _stack([reqs[i].speech for i, _ in rows])
    prompts = [_prompt(model, TAG_TASKS[k]) for _, k in rows]
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
    batch, lengths = _stack([reqs[i].speech for i in chat])
    inputs = model.splice([_prompt(model, "sttc")] * len(chat), batch, lengths, [reqs[i].transcript_ids + sep for i in chat])
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
    lone partial) or all in one batched LLM pass (CUDA)."""
    encoded = _encode_chunks(model, reqs)
    chunks = [(torch.cat([r.speech, new[0]]) if r.speech.numel() else new[0], cache) for r, (new, cache) in zip(reqs, encoded)]
    out = [PartialResult(cache, speech, list(r.committed), 0) for r, (speech, cache) in zip(reqs, chunks)]
    rows = [b for b, (speech, _) in enumerate(chunks) if speech.shape[0] > 0]  # no speech frames yet: nothing to decode
    # speech frames run at 12.5 Hz (whisper's 50 Hz / 4); committed tokens are never cut
    limits = {b: max(len(reqs[b].committed), _budget(chunks[b][0].shape[0] / 12.5, reqs[b].max_new_tokens)) for b in rows}
    # One by one on each session's LLM cache (only new frames and text computed), or all in one
    # batch from scratch (the caches cannot be stacked cheaply). On CPU the prefill dominates
    # (int8 osum-mini: ~350 ms for a 5 s utterance's prefix, ~100 ms for a partial's new part,
    # while a 4-row decoding step costs about a 1-row one): reuse wins. On CUDA, batch.
    if len(rows) == 1 or (rows and model.device.type == "cpu"):
        for b in rows:
            r, speech = reqs[b], chunks[b][0]
            new = speech[r.speech.shape[0] :] if r.llm_cache is not None else speech
            tokens, verified, kv = _partial_with_cache(model, new, r.llm_cache, r.committed, r.draft, limits[b])
            out[b].tokens, out[b].verified, out[b].llm_cache = tokens, verified, kv
    elif rows:
        decoded = verify_and_decode_batch(model, [chunks[b][0] for b in rows], [reqs[b].committed for b in rows],
                                          [reqs[b].draft for b in rows], [limits[b] for b in rows])  # fmt: skip
        for b, (tokens, _, verified) in zip(rows, decoded):
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


def _verified_prefix(forced: list[int], draft: list[int], verified: int) -> tuple[list[int], bool]:
    """forced + the accepted draft, cut where a runaway loop completes in it (as token-by-token
    decoding would have stopped there; never into ``forced``); and whether it was cut."""
    tokens = forced + draft[:verified]
    cut = first_loop_cut(tokens, len(forced))
    return (tokens, False) if cut is None else (tokens[: max(cut, len(forced))], True)


def _looped(tokens: list[int], lps: list[float] | None, frozen: int) -> bool:
    """After appending a token: cut a runaway loop that it completes (never into the first
    ``frozen`` tokens) and say so: decoding stops there."""
    cut = loop_cut(tokens)
    if cut is None:
        return False
    keep = max(cut, frozen)
    del tokens[keep:]
    if lps is not None:
        del lps[keep:]
    return True


def _accepted(greedy: list[int], draft: list[int], room: int) -> int:
    """How many leading draft tokens equal the greedy choices at their positions (at most ``room``)."""
    n = 0
    while n < min(len(draft), room) and greedy[n] == draft[n]:
        n += 1
    return n


def _partial_with_cache(
    model: OsumModel, new_speech: torch.Tensor, kv: Any, forced: list[int], draft: list[int], max_tokens: int
) -> tuple[list[int], int, Any]:
    """:func:`verify_and_decode` for one partial, on top of the session's cached prefix.

    ``kv`` holds [prompt, speech-begin, earlier speech] (None: start it); the new speech
    frames are appended to it (the chunked encoder never changes earlier frames, and the LLM
    is causal, so the cached positions stay valid), then [speech-end, forced, draft] are
    verified and decoding continues as usual. The cache is cropped back to the prefix and
    returned. Same tokens as recomputing everything, up to rounding.
    """
    llm, dev, dt = model.llm, model.device, model.llm_dtype
    begin, end = (e.to(dt) for e in model.boundary_embeddings())
    table = llm.get_input_embeddings()
    new_speech = new_speech.to(dt)
    if kv is None:
        kv = _new_cache(llm)
        prompt = table(torch.tensor(_prompt(model, "asr"), device=dev))
        new_speech = torch.cat([prompt, begin[None], new_speech])
    if new_speech.shape[0]:
        _feed(llm, new_speech, kv, kv.get_seq_length())
    n = kv.get_seq_length()  # the prefix this session keeps
    prefix = forced + draft
    tail = torch.cat([end[None], table(torch.tensor(prefix, dtype=torch.long, device=dev))]) if prefix else end[None]
    logp = _feed(llm, tail, kv, n, keep=len(tail)).log_softmax(-1)  # row i predicts prefix token i
    pred = logp.argmax(-1).tolist()
    verified = _accepted(pred[len(forced) :], draft, max_tokens - len(forced))
    tokens, stop = _verified_prefix(forced, draft, verified)
    if len(prefix) > len(tokens):
        kv.crop(len(tokens) - len(prefix))  # drop the rejected draft (transformers 5: a negative count)
    nxt = pred[len(tokens)]
    eos = model.cfg.eos_token_id
    while not stop and len(tokens) < max_tokens and nxt != eos:
        tokens.append(nxt)
        if _looped(tokens, None, len(forced)):
            break
        step = _feed(llm, table(torch.tensor([nxt], device=dev)), kv, n + len(tokens), keep=1)
        nxt = int(step[-1].argmax())
    if kv.get_seq_length() > n:
        kv.crop(n - kv.get_seq_length())  # back to the prefix this session keeps
    return tokens, verified, kv


def _feed(llm: Any, embeds: torch.Tensor, kv: Any, past: int, keep: int = 1) -> torch.Tensor:
    """Run (t, d) embeddings at positions past..past+t-1 after the cached ones; logits (keep, V)."""
    t = embeds.shape[0]
    mask = torch.ones(1, past + t, dtype=torch.long, device=embeds.device)
    pos = torch.arange(past, past + t, device=embeds.device)[None]
    out = llm(inputs_embeds=embeds[None], attention_mask=mask, position_ids=pos, cache=kv, use_cache=True, logits_to_keep=keep)
    return out.logits[0].float()


def verify_and_decode_batch(
    model: OsumModel, speech: list[torch.Tensor], forced: list[list[int]], draft: list[list[int]], max_tokens: list[int]
) -> list[tuple[list[int], list[float], int]]:
    """:func:`verify_and_decode` for many utterances at once: one verifying forward pass over
    all rows, then greedy steps of all rows together until each stops.

    A row whose draft is cut keeps the rejected positions in the shared cache, masked out of
    attention (rows cannot be cropped separately); its new tokens take the positions after
    its accepted prefix. The rows' drafts are verified together in the one pass (not row by
    row as :func:`verify_and_decode` does), and outside the int8 LLM padding changes the
    arithmetic too, so a batched row can differ from the single-row result where two tokens
    are within rounding of each other: fine for partials, which is why finals use the
    single-row form.
    """
    B = len(speech)
    if B == 1:
        return [verify_and_decode(model, speech[0], forced[0], draft[0], max_tokens[0])]
    eos, dev = model.cfg.eos_token_id, model.device
    prefixes = [f + d for f, d in zip(forced, draft)]
    batch, lengths = _stack(speech)
    inputs = model.splice([_prompt(model, "asr")] * B, batch, lengths, prefixes)
    P = max(len(p) for p in prefixes)
    kv = _new_cache(model.llm)
    out = model.llm(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                    cache=kv, use_cache=True, logits_to_keep=P + 1)  # fmt: skip
    logp = out.logits.float().log_softmax(-1)  # (B, P + 1, V): window index j is position S - P - 1 + j
    pred = logp.argmax(-1).tolist()
    S = inputs.embeds.shape[1]
    mask = inputs.attention_mask.clone()
    pos = inputs.position_ids[:, -1:].clone()
    results: list[tuple[list[int], list[float], int]] = []
    nxt, nxt_lp, stops = [], [], []
    for b in range(B):
        base = P - len(prefixes[b])  # window index predicting the row's first prefix token
        verified = _accepted(pred[b][base + len(forced[b]) :], draft[b], max_tokens[b] - len(forced[b]))
        tokens, stopped = _verified_prefix(forced[b], draft[b], verified)
        lps = [float(logp[b, base + i, t]) for i, t in enumerate(tokens)]
        drop = len(prefixes[b]) - len(tokens)
        if drop:
            mask[b, S - drop :] = 0  # the rejected draft: masked, not cropped
            pos[b] -= drop
        j = base + len(tokens)
        nxt.append(pred[b][j])
        nxt_lp.append(float(logp[b, j].max()))
        results.append((tokens, lps, verified))
        stops.append(stopped)
    live = [not stops[b] and len(results[b][0]) < max_tokens[b] and nxt[b] != eos for b in range(B)]
    while any(live):
        for b in range(B):
            if live[b]:
                results[b][0].append(nxt[b])
                results[b][1].append(nxt_lp[b])
                if _looped(results[b][0], results[b][1], len(forced[b])):
                    live[b] = False
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        step = _step(model.llm, torch.tensor([[t] for t in nxt], device=dev), mask, pos, kv)[:, -1].log_softmax(-1)
        best = step.max(-1)
        nxt, nxt_lp = best.indices.tolist(), best.values.tolist()
        live = [live[b] and len(results[b][0]) < max_tokens[b] and nxt[b] != eos for b in range(B)]
    return results


def verify_and_decode(
    model: OsumModel, speech: torch.Tensor, forced: list[int], draft: list[int], max_tokens: int
) -> tuple[list[int], list[float], int]:
    """Greedy decoding after the ASR prompt and ``speech``, with ``forced`` tokens imposed and
    ``draft`` tokens checked in the same forward pass.

    Draft tokens are accepted while they equal the greedy choice, so with no forced tokens
    the result is exactly greedy decoding from scratch, whatever the draft; a good draft
    just saves the decoding steps. Returns (tokens, their log-probabilities, draft tokens
    accepted); stops at eos or ``max_tokens``.
    """
    eos = model.cfg.eos_token_id
    prefix = forced + draft
    inputs = model.splice([_prompt(model, "asr")], speech[None], torch.tensor([speech.shape[0]]), [prefix])
    kv = _new_cache(model.llm)
    # logits at position p predict token p + 1: only the last len(prefix) + 1 positions matter.
    # The prefix's attention rows one by one, as token-by-token decoding computes them (with the
    # int8 LLM's "osum_rows" attention; elsewhere a no-op): the Final is then offline's, bit for bit
    with rows_singly_from(inputs.embeds.shape[1] - len(prefix)):
        out = model.llm(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                        position_ids=inputs.position_ids, cache=kv, use_cache=True, logits_to_keep=len(prefix) + 1)  # fmt: skip
    logp = out.logits[0].float().log_softmax(-1)
    pred = logp.argmax(-1).tolist()
    verified = _accepted(pred[len(forced) :], draft, max_tokens - len(forced))
    tokens, stop = _verified_prefix(forced, draft, verified)
    lps = [float(logp[i, t]) for i, t in enumerate(tokens)]
    drop = len(prefix) - len(tokens)  # cached positions after the accepted prefix
    if drop:
        kv.crop(-drop)  # type: ignore[attr-defined]  # transformers 5: a negative count removes that many
    nxt, nxt_lp = pred[len(tokens)], float(logp[len(tokens)].max())
    mask = inputs.attention_mask[:, : inputs.attention_mask.shape[1] - drop]
    pos = int(inputs.position_ids[0, -1]) - drop
    while not stop and len(tokens) < max_tokens and nxt != eos:
        tokens.append(nxt)
        lps.append(nxt_lp)
        if _looped(tokens, lps, len(forced)):
            break
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        pos += 1
        step = _step(model.llm, torch.tensor([[nxt]], device=model.device), mask,
                     torch.tensor([[pos]], device=model.device), kv)[0, -1].log_softmax(-1)  # fmt: skip
        nxt, nxt_lp = int(step.argmax()), float(step.max())
    return tokens, lps, verified
