"""Offline recognition: audio + task -> transcript, tags with confidences, words, reply.

:func:`recognize` runs a batch of utterances through the whole model:
log-mel -> encoder -> adapter -> splice with the task's prompt -> decode -> parse,
then scores every tag slot over its closed label set (the transcript teacher-forced)
so each tag carries a probability.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from .audio import SAMPLE_RATE, log_mel, prepare_audio
from .decoding import DecodingOptions, Hypothesis, generate, score_continuations
from .errors import UnsupportedTaskError
from .model import OsumModel
from .tasks import LABELS, ParsedOutput, Tag, Task, get_task, parse_output
from .timing import require_aligner

__all__ = ["Result", "features", "pad_mels", "recognize", "resolve_task", "slot_ids"]


@dataclass(frozen=True)
class Result:
    """One utterance's recognition result."""

    task: str
    transcript: str | None
    tags: tuple[Tag, ...] = ()
    words: tuple[Any, ...] | None = None
    answer: str | None = None
    problems: tuple[str, ...] = ()
    raw: str = ""  # the model's text
    tokens: tuple[int, ...] = ()
    confidence: float | None = None  # mean per-token probability of the generated text
    truncated: bool = False  # stopped by max_new_tokens
    duration: float = 0.0  # seconds of audio

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        return d


def features(audio: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Validated audio -> OSUM log-mel (n_mels, T)."""
    return log_mel(prepare_audio(audio, sample_rate))


def slot_ids(tokenizer: Any, task: Task, slot: int, label: str) -> list[int]:
    """Token ids of tag slot ``slot`` as written after the transcript: ``separator + <label>``.

    Training targets and closed-set candidates are both built from these pieces
    (transcript ids + each slot's ids + eos), so both see the same tokenisation.
    """
    sep = task.tag_separator if slot else ""
    return tokenizer.encode(f"{sep}<{label}>", add_special_tokens=False)


def pad_mels(mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_mels, T_i) log-mels -> a zero-padded batch (B, n_mels, T) and the lengths (B,)."""
    T = max(m.shape[1] for m in mels)
    batch = torch.zeros(len(mels), mels[0].shape[0], T)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    return batch, torch.tensor([m.shape[1] for m in mels])


def resolve_task(model: OsumModel, task: str | Task, word_times: bool = False) -> tuple[Task, bool]:
    """The task ``model`` will run for ``task`` and whether its words are timed.

    SRWT asked of a model with an aligner but not trained on SRWT becomes ASR with word times.

    Raises:
        UnknownTaskError / UnsupportedTaskError: the task does not exist or this model lacks it.
    """
    task = task if isinstance(task, Task) else get_task(task)
    supported = model.cfg.supported_tasks
    if supported is not None and task.name not in supported:
        if task.timestamps and not task.tags and model.aligner is not None:
            # SRWT from a model not trained on it (osum-mini): its transcript, timed by the aligner
            return get_task("asr"), True
        raise UnsupportedTaskError(
            f"model {model.cfg.name!r} does not support task {task.name!r} (supported: {', '.join(supported)})"
        )
    return task, word_times


@torch.inference_mode()
def recognize(
    model: OsumModel,
    audios: list[np.ndarray] | np.ndarray,
    task: str | Task = "asr",
    options: DecodingOptions | None = None,
    sample_rate: int = SAMPLE_RATE,
    score_tags: bool = True,
    word_times: bool = False,
) -> list[Result]:
    """Recognise a batch of utterances (each at most 30 s) with one task.

    ``word_times``: the transcript's word times from the model's word aligner
    (:mod:`osum.timing`; osum-mini), where the task does not write them itself (SRWT does).
    SRWT asked of a model with an aligner but not trained on SRWT is ASR with ``word_times``
    (its results then say task ``asr``).

    Raises:
        InvalidAudioError / AudioTooLongError: bad audio.
        UnknownTaskError / UnsupportedTaskError: the task does not exist or this model lacks it
            (or ``word_times`` was asked of a model without a word aligner).
    """
    task, word_times = resolve_task(model, task, word_times)
    aligner = require_aligner(model) if word_times else None
    options = options or DecodingOptions()
    if isinstance(audios, np.ndarray) and audios.ndim == 1:
        audios = [audios]
    signals = [prepare_audio(a, sample_rate) for a in audios]
    speech, speech_len, states = model.encode_each_with_states([log_mel(s) for s in signals])  # each alone: batch-independent
    tok = model.tokenizer
    prompt = tok.encode(task.prompt, add_special_tokens=False)
    prompts = [prompt] * len(signals)
    budgets = [task.token_budget(len(s) / SAMPLE_RATE) for s in signals]
    hyps = generate(model.llm, model.splice(prompts, speech, speech_len), options, model.cfg.eos_token_id, row_limits=budgets)
    parsed = [parse_output(task, tok.decode(h.tokens, skip_special_tokens=False)) for h in hyps]
    if score_tags and task.tags:
        parsed = _score_tags(model, task, prompts, speech, speech_len, parsed)
    if aligner is not None:
        parsed = [p if p.words or not p.transcript else replace(p, words=aligner.align(x, p.transcript, len(a) / SAMPLE_RATE))
                  for p, x, a in zip(parsed, states, signals)]  # fmt: skip
    return [_result(p, h, len(s) / SAMPLE_RATE) for p, h, s in zip(parsed, hyps, signals)]


def _result(p: ParsedOutput, h: Hypothesis, duration: float) -> Result:
    conf = float(np.exp(np.mean(h.token_logprobs))) if h.token_logprobs else None
    return Result(
        task=p.task, transcript=p.transcript, tags=p.tags, words=p.words, answer=p.answer, problems=p.problems,
        raw=p.raw, tokens=tuple(h.tokens), confidence=conf, truncated=not h.finished, duration=duration,
    )  # fmt: skip


def _score_tags(
    model: OsumModel,
    task: Task,
    prompts: list[list[int]],
    speech: torch.Tensor,
    speech_len: torch.Tensor,
    parsed: list[ParsedOutput],
) -> list[ParsedOutput]:
    """Closed-set scoring of each tag slot, given the transcript and the earlier slots' labels."""
    tok, eos = model.tokenizer, model.cfg.eos_token_id
    B = len(parsed)
    prefixes = [tok.encode(p.transcript, add_special_tokens=False) if p.transcript else [] for p in parsed]
    scored: list[list[Tag]] = [[] for _ in range(B)]
    for slot, kind in enumerate(task.tags):
        labels = list(LABELS[kind])
        last = slot == len(task.tags) - 1
        cands = [slot_ids(tok, task, slot, lab) + ([eos] if last else []) for lab in labels]
        inputs = model.splice(prompts, speech, speech_len, prefixes)
        logps = score_continuations(model.llm, inputs, [cands] * B)
        for b in range(B):
            probs = torch.tensor(logps[b]).softmax(-1).tolist()
            dist = dict(zip(labels, probs))
            gen = parsed[b].tags[slot] if slot < len(parsed[b].tags) else None
            if gen is not None and gen.valid:
                tag = replace(gen, score=dist[gen.label], scores=dist)
            elif gen is not None:  # the model wrote a label outside the set: keep it, unscored
                tag = replace(gen, scores=dist)
            else:  # missing: the problem is already recorded; the distribution is still useful
                tag = Tag(kind, "", valid=False, scores=dist)
            scored[b].append(tag)
            # the next slot is conditioned on the label the model wrote, else on the best one
            chosen = tag.label if tag.valid else max(dist, key=dist.__getitem__)
            prefixes[b] = prefixes[b] + slot_ids(tok, task, slot, chosen)
    return [replace(p, tags=tuple(scored[b])) for b, p in enumerate(parsed)]
