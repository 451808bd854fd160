"""Draft verification: greedy decoding that checks a previous hypothesis in one forward pass.

A partial's unstable tail, or the last partial at a Final, is a *draft*: the model runs
[prompt, speech, forced tokens, draft] once, accepts draft tokens while they equal its greedy
choice at their positions, and decodes on only from the first disagreement. With no forced
tokens the result is exactly greedy decoding from scratch, whatever the draft; a draft that
holds just saves the decoding steps (the Final's latency on CPU is mostly tokens decoded past
a wrong draft). Three forms: one utterance from scratch (:func:`verify_and_decode`, what a
Final runs), one partial on its session's cached LLM prefix (:func:`partial_on_cache`, CPU),
and many partials in one batch (:func:`verify_and_decode_batch`, CUDA).
"""

from __future__ import annotations

from typing import Any

import torch

from osum.attention import rows_singly_from
from osum.decoding import first_loop_cut, llm_step, loop_cut, new_cache
from osum.model import OsumModel, stack_speech
from osum.tasks import get_task

__all__ = ["budget", "partial_on_cache", "task_prompt", "verify_and_decode", "verify_and_decode_batch"]


def budget(seconds: float, limit: int) -> int:
    """ASR's token budget for ``seconds`` of speech (as offline recognition uses), within ``limit``."""
    return min(limit, get_task("asr").token_budget(seconds) or limit)


def task_prompt(model: OsumModel, task: str) -> list[int]:
    return model.tokenizer.encode(get_task(task).prompt, add_special_tokens=False)


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


def partial_on_cache(
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
        kv = new_cache(llm)
        prompt = table(torch.tensor(task_prompt(model, "asr"), device=dev))
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
    batch, lengths = stack_speech(speech)
    inputs = model.splice([task_prompt(model, "asr")] * B, batch, lengths, prefixes)
    P = max(len(p) for p in prefixes)
    kv = new_cache(model.llm)
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
        step = llm_step(model.llm, torch.tensor([[t] for t in nxt], device=dev), mask, pos, kv)[:, -1].log_softmax(-1)
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
    inputs = model.splice([task_prompt(model, "asr")], speech[None], torch.tensor([speech.shape[0]]), [prefix])
    kv = new_cache(model.llm)
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
        step = llm_step(model.llm, torch.tensor([[nxt]], device=model.device), mask,
                        torch.tensor([[pos]], device=model.device), kv)[0, -1].log_softmax(-1)  # fmt: skip
        nxt, nxt_lp = int(step.argmax()), float(step.max())
    return tokens, lps, verified
