"""Decoding the LLM from spliced inputs: greedy, beam search, OSUM's beam sampling, closed-set scoring.

All of it runs batched over utterances of different lengths (left-padded
:class:`~osum.model.SplicedInputs`) with transformers' ``DynamicCache``, so each step
feeds one token per row. Decoding is deterministic by default (greedy);
:meth:`DecodingOptions.osum_paper` gives OSUM's released settings (beam sampling: 4
beams, top-k 5, top-p 0.9, repetition penalty 1.05), seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidConfigError
from .model import SplicedInputs

__all__ = ["DecodingOptions", "Hypothesis", "first_loop_cut", "generate", "llm_step", "loop_cut", "new_cache", "score_continuations"]

# A runaway loop: one n-gram (n <= 32 tokens) repeated at least 4 times in a row over at least
# 16 tokens ("decimal, decimal, ..."; a single token 16 times; two alternating menu lines,
# "dial 3 to send this call to ..., dial 4 to send this call to ...", ~20 tokens a cycle).
# Spoken repetitions stay well under it ("no, no, no": 3 x 2 tokens; "1,000,000" is ", 0 0 0"
# twice; a menu says each line once).
LOOP_MAX_NGRAM, LOOP_MIN_REPEATS, LOOP_MIN_TOKENS = 32, 4, 16


def loop_cut(tokens: list[int], end: int | None = None) -> int | None:
    """If ``tokens[:end]`` ends in a runaway loop, the length that keeps one copy of its
    n-gram (what decoding keeps when it stops there); else None."""
    L = len(tokens) if end is None else end
    for n in range(1, LOOP_MAX_NGRAM + 1):
        need = max(LOOP_MIN_REPEATS, -(-LOOP_MIN_TOKENS // n))
        if L < need * n:
            break
        unit = tokens[L - n : L]
        if all(tokens[L - (i + 1) * n : L - i * n] == unit for i in range(1, need)):
            return L - (need - 1) * n
    return None


def first_loop_cut(tokens: list[int], start: int = 0) -> int | None:
    """:func:`loop_cut` at the first length past ``start`` where a loop completes (what
    token-by-token decoding with the guard would have kept), or None."""
    for end in range(start + 1, len(tokens) + 1):
        if (cut := loop_cut(tokens, end)) is not None:
            return cut
    return None


@dataclass(frozen=True)
class DecodingOptions:
    """How to pick tokens. Validated once, here; override with ``dataclasses.replace``."""

    beam_size: int = 1  # 1 = greedy
    max_new_tokens: int = 400  # OSUM's limit
    # sampling (off by default: deterministic)
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int = 777  # OSUM's inference seed; used only when sampling
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search: hypothesis score = logprob / len ** length_penalty
    # greedy and sampling: stop a row that loops (see LOOP_*) and keep one copy of the loop
    # (with an on_step callback, which has streamed the tokens, keep them all); a looping LLM
    # otherwise writes until its token budget (OSUM's own decoding has no guard)
    loop_guard: bool = True

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise InvalidConfigError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_new_tokens < 1:
            raise InvalidConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise InvalidConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InvalidConfigError(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")
        if not self.repetition_penalty > 0:
            raise InvalidConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def osum_paper(cls, seed: int = 777) -> DecodingOptions:
        """OSUM's hard-coded ``generate`` settings (beam sampling), with a fixed seed."""
        return cls(beam_size=4, sample=True, top_k=5, top_p=0.9, temperature=1.0, repetition_penalty=1.05, seed=seed,
                   loop_guard=False)  # fmt: skip


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without the eos
    logprob: float  # sum of the chosen tokens' log-probabilities (model distribution, eos included)
    token_logprobs: list[float] = field(default_factory=list)
    finished: bool = True  # False: stopped by max_new_tokens


def new_cache(llm: nn.Module) -> object:
    """An empty key/value cache for ``llm`` (transformers' ``DynamicCache``)."""
    from transformers import DynamicCache

    return DynamicCache(config=llm.config)


@torch.inference_mode()
def _prefill(llm: nn.Module, inputs: SplicedInputs, cache: object) -> torch.Tensor:
    out = llm(
        inputs_embeds=inputs.embeds,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


@torch.inference_mode()
def llm_step(llm: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: object) -> torch.Tensor:
    """Feed (N, t) tokens at (N, t) positions; returns logits (N, t, V) in fp32."""
    out = llm(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.logits.float()


def _penalize(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """HF's repetition penalty on tokens already generated in each row."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for r, toks in enumerate(history):
        if toks:
            idx = torch.tensor(sorted(set(toks)), device=logits.device)
            v = logits[r, idx]
            logits[r, idx] = torch.where(v < 0, v * penalty, v / penalty)
    return logits


def _sampling_logprobs(logits: torch.Tensor, opt: DecodingOptions) -> torch.Tensor:
    """Temperature, top-k and top-p applied; filtered entries are -inf."""
    logits = logits / opt.temperature
    if opt.top_k:
        kth = torch.topk(logits, min(opt.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opt.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > opt.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return F.log_softmax(logits, dim=-1)


def generate(llm: nn.Module, inputs: SplicedInputs, options: DecodingOptions, eos_id: int,
             on_step: Callable[[list[Hypothesis]], None] | None = None,
             row_limits: list[int | None] | None = None) -> list[Hypothesis]:  # fmt: skip
    """Decode one hypothesis per row of ``inputs``.

    Stops a row at ``eos_id`` or after ``options.max_new_tokens`` tokens, or its own
    ``row_limits`` entry when that is smaller (greedy and sampling; beam search takes the
    largest for all rows). ``on_step`` (greedy and sampling only: a beam's best prefix can
    still change) sees the hypotheses after every step, for streaming the text as it is written.
    """
    B = inputs.embeds.shape[0]
    limits = [min(options.max_new_tokens, r) if r is not None else options.max_new_tokens
              for r in (row_limits or [None] * B)]  # fmt: skip
    if len(limits) != B:
        raise ValueError("one row limit per row")
    if options.beam_size == 1:
        return _greedy_or_sample(llm, inputs, replace(options, max_new_tokens=max(limits)), eos_id, on_step, limits)
    if on_step is not None:
        raise ValueError("on_step needs beam_size 1")
    return _beam(llm, inputs, replace(options, max_new_tokens=max(limits)), eos_id)


def _greedy_or_sample(llm: nn.Module, inputs: SplicedInputs, opt: DecodingOptions, eos_id: int,
                      on_step: Callable[[list[Hypothesis]], None] | None, limits: list[int]) -> list[Hypothesis]:  # fmt: skip
    B = inputs.embeds.shape[0]
    dev = inputs.embeds.device
    gen = torch.Generator(device=dev).manual_seed(opt.seed) if opt.sample else None
    cache = new_cache(llm)
    logits = _prefill(llm, inputs, cache)
    mask, pos = inputs.attention_mask, inputs.position_ids[:, -1:]
    hyps = [Hypothesis([], 0.0, finished=False) for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(opt.max_new_tokens):
        logits = _penalize(logits, [h.tokens for h in hyps], opt.repetition_penalty)
        logprobs = F.log_softmax(logits, dim=-1)
        if opt.sample:
            tok = torch.multinomial(_sampling_logprobs(logits, opt).exp(), 1, generator=gen)[:, 0]
        else:
            tok = logprobs.argmax(-1)
        chosen = logprobs.gather(1, tok[:, None])[:, 0]
        for b in range(B):
            if done[b]:
                continue
            t, lp = int(tok[b]), float(chosen[b])
            hyps[b].logprob += lp
            if t == eos_id:
                hyps[b].finished = True
            else:
                hyps[b].tokens.append(t)
                hyps[b].token_logprobs.append(lp)
                if opt.loop_guard and (cut := loop_cut(hyps[b].tokens)) is not None:
                    if on_step is None:  # streamed tokens are out already: a streaming caller keeps them
                        hyps[b].logprob -= sum(hyps[b].token_logprobs[cut:])
                        del hyps[b].tokens[cut:], hyps[b].token_logprobs[cut:]
                    done[b] = True  # a runaway loop: stopped, not finished
                elif len(hyps[b].tokens) >= limits[b]:
                    done[b] = True  # its budget: stopped, not finished
        done |= tok == eos_id
        if on_step is not None:
            on_step(hyps)
        if bool(done.all()) or step == opt.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        logits = llm_step(llm, tok[:, None], mask, pos, cache)[:, -1]
    return hyps


@dataclass
class _Beams:
    """Finished hypotheses of one utterance."""

    done: list[tuple[float, Hypothesis]] = field(default_factory=list)  # (normalised score, hyp)
    closed: bool = False


def _beam(llm: nn.Module, inputs: SplicedInputs, opt: DecodingOptions, eos_id: int) -> list[Hypothesis]:
    B, K = inputs.embeds.shape[0], opt.beam_size
    dev = inputs.embeds.device
    gen = torch.Generator(device=dev).manual_seed(opt.seed) if opt.sample else None
    cache = new_cache(llm)
    logits = _prefill(llm, inputs, cache).repeat_interleave(K, dim=0)  # (B*K, V)
    cache.batch_repeat_interleave(K)  # type: ignore[attr-defined]
    mask = inputs.attention_mask.repeat_interleave(K, dim=0)
    pos = inputs.position_ids[:, -1:].repeat_interleave(K, dim=0)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # only the first beam is live at the start
    seqs: list[Hypothesis] = [Hypothesis([], 0.0, finished=False) for _ in range(B * K)]
    beams = [_Beams() for _ in range(B)]
    V = logits.shape[-1]
    for step in range(opt.max_new_tokens):
        logits = _penalize(logits, [h.tokens for h in seqs], opt.repetition_penalty)
        logprobs = F.log_softmax(logits, dim=-1)  # the model's distribution, for scores
        pick = _sampling_logprobs(logits, opt) if opt.sample else logprobs
        cand = (scores.view(-1, 1) + pick).view(B, K * V)
        if opt.sample:
            probs = cand.softmax(-1).nan_to_num(0.0)
            n = min(2 * K, int((probs > 0).sum(-1).min()))
            idx = torch.multinomial(probs, n, generator=gen)
            idx = idx.gather(1, cand.gather(1, idx).argsort(-1, descending=True))
        else:
            idx = cand.topk(2 * K, dim=-1).indices
        length = step + 1
        new_scores = torch.full((B, K), float("-inf"), device=dev)
        src = torch.arange(B * K, device=dev)  # which old row each new row continues
        new_seqs = list(seqs)
        for b in range(B):
            if beams[b].closed:
                continue
            k = 0
            for rank, flat in enumerate(idx[b].tolist()):
                beam, tok = divmod(flat, V)
                row = b * K + beam
                lp = float(logprobs[row, tok])
                total = seqs[row].logprob + lp
                if tok == eos_id:
                    if rank < K:
                        h = Hypothesis(list(seqs[row].tokens), total, list(seqs[row].token_logprobs))
                        beams[b].done.append((total / length**opt.length_penalty, h))
                    continue
                new_scores[b, k] = float(cand[b, flat]) if opt.sample else total
                src[b * K + k] = row
                new_seqs[b * K + k] = Hypothesis(seqs[row].tokens + [tok], total, seqs[row].token_logprobs + [lp], False)
                k += 1
                if k == K:
                    break
            done = sorted(beams[b].done, key=lambda x: -x[0])[:K]
            beams[b].done = done
            best_running = max(h.logprob for h in new_seqs[b * K : b * K + k]) / length**opt.length_penalty
            if len(done) >= K and best_running <= done[-1][0]:
                beams[b].closed = True
        seqs, scores = new_seqs, new_scores
        if all(bm.closed for bm in beams) or step == opt.max_new_tokens - 1:
            break
        cache.reorder_cache(src)  # type: ignore[attr-defined]
        tok = torch.tensor([h.tokens[-1] if h.tokens else eos_id for h in seqs], device=dev)
        mask = torch.cat([mask, mask.new_ones(B * K, 1)], dim=1)
        pos = pos + 1
        logits = llm_step(llm, tok[:, None], mask, pos, cache)[:, -1]
    out = []
    for b in range(B):
        if not beams[b].done:  # nothing reached eos: best running beam, marked unfinished
            running = seqs[b * K : b * K + K]
            out.append(max(running, key=lambda h: h.logprob))
        else:
            out.append(max(beams[b].done, key=lambda x: x[0])[1])
    return out


@torch.inference_mode()
def score_continuations(llm: nn.Module, inputs: SplicedInputs, candidates: list[list[list[int]]]) -> list[list[float]]:
    """Log-probability of each candidate token sequence after each row's prefix.

    The prefix is run once; its cache is then shared by all the row's candidates,
    which are scored together in one teacher-forced pass.

    Args:
        inputs: B prefixes (left-padded).
        candidates: per row, a list of non-empty token sequences.
    Returns:
        per row, one summed log-probability per candidate.
    """
    B = inputs.embeds.shape[0]
    if len(candidates) != B or any(not c or not all(c) for c in candidates):
        raise ValueError("each row needs at least one non-empty candidate")
    dev = inputs.embeds.device
    cache = new_cache(llm)
    first = F.log_softmax(_prefill(llm, inputs, cache), dim=-1)  # (B, V)
    N = max(len(c) for c in candidates)
    L = max(len(s) for c in candidates for s in c)
    # rows b*N + n: candidate n of prefix b, padded with copies of its first candidate
    flat = [c[n] if n < len(c) else c[0] for c in candidates for n in range(N)]
    toks = torch.tensor([s + [s[-1]] * (L - len(s)) for s in flat], device=dev)  # (B*N, L)
    lens = torch.tensor([len(s) for s in flat], device=dev)
    lp = first.repeat_interleave(N, dim=0).gather(1, toks[:, :1])  # (B*N, 1)
    if L > 1:
        cache.batch_repeat_interleave(N)  # type: ignore[attr-defined]
        mask = inputs.attention_mask.repeat_interleave(N, dim=0)
        mask = torch.cat([mask, mask.new_ones(B * N, L - 1)], dim=1)
        pos = inputs.position_ids[:, -1:].repeat_interleave(N, dim=0) + torch.arange(1, L, device=dev)[None]
        logits = llm_step(llm, toks[:, :-1], mask, pos, cache)  # (B*N, L-1, V)
        rest = F.log_softmax(logits, dim=-1).gather(2, toks[:, 1:, None])[..., 0]
        lp = torch.cat([lp, rest], dim=1)
    valid = torch.arange(L, device=dev)[None] < lens[:, None]
    total = (lp * valid).sum(-1).view(B, N)
    return [total[b, : len(candidates[b])].tolist() for b in range(B)]
