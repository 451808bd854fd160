"""What osum-mini's training minimises: CTC against the LLM's vocabulary, and ASR+X through the LLM.

* :class:`CTCHead` and :func:`ctc_loss`: the adapter's 12.5 Hz outputs scored against the
  frozen input-embedding rows of the tokens seen in the training texts (``s * cos(h, E[v])``)
  plus a learned blank. It puts speech into the LLM's embedding space before (``ctc`` stage)
  and beside (``joint`` stage, as an auxiliary) the LLM's own loss.
* :func:`asr_x_example` and :func:`llm_loss`: OSUM's recipe. A task is drawn per item; the
  target is the transcript, then the task's tags (ASR+X), then eos; the loss is the mean
  cross-entropy of the targets through the frozen LLM with LoRA, laid out as
  ``[prompt, speech-begin, speech, speech-end, targets]``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import OsumModel
from ..tasks import get_task

__all__ = ["CTCHead", "asr_x_example", "ctc_loss", "llm_loss", "shared_prompt_hidden"]


class CTCHead(nn.Module):
    """CTC over a subset of the LLM's vocabulary, tied to its frozen input embeddings."""

    def __init__(self, embeddings: torch.Tensor, vocab: list[int]) -> None:
        super().__init__()
        self.register_buffer("vocab", torch.tensor(vocab, dtype=torch.long))
        self.register_buffer("table", F.normalize(embeddings[vocab].float(), dim=-1))  # (V, d), frozen
        self.blank = nn.Parameter(torch.randn(embeddings.shape[1]) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(16.0)))
        self.index = {t: i + 1 for i, t in enumerate(vocab)}  # 0 is the blank

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, L, d) -> log-probs (B, L, 1 + V)."""
        table = torch.cat([F.normalize(self.blank, dim=-1)[None], self.table])
        logits = self.log_scale.exp() * F.normalize(h.float(), dim=-1) @ table.T
        return logits.log_softmax(-1)

    def targets(self, ids: list[int]) -> list[int]:
        """LLM token ids -> this head's classes (unseen types cannot be emitted, so they are dropped)."""
        return [self.index[t] for t in ids if t in self.index]

    def greedy(self, logp: torch.Tensor, length: int) -> list[int]:
        """Best path of one row's ``logp`` (L, 1 + V) up to ``length``: repeats merged, blanks dropped."""
        best = logp[:length].argmax(-1).tolist()
        out, prev = [], 0
        for b in best:
            if b != prev and b != 0:
                out.append(int(self.vocab[b - 1]))
            prev = b
        return out


def ctc_loss(head: CTCHead, speech: torch.Tensor, lengths: torch.Tensor, texts: list[list[int]]) -> torch.Tensor:
    """CTC loss per target token of ``texts`` (LLM token ids per row) on ``speech`` (B, L, d)."""
    logp = head(speech)  # (B, L, 1 + V)
    targets = [head.targets(ids) for ids in texts]
    flat = torch.tensor([t for ts in targets for t in ts], dtype=torch.long, device=speech.device)
    tl = torch.tensor([len(t) for t in targets], device=speech.device)
    loss = F.ctc_loss(logp.transpose(0, 1), flat, lengths, tl, blank=0, reduction="sum", zero_infinity=True)
    return loss / tl.sum().clamp(min=1)


def asr_x_example(tok: Any, item: dict, tasks: dict[str, float], real_weight: float, rng: random.Random,
                  eos: int) -> tuple[list[int], list[int]]:  # fmt: skip
    """(prompt ids, target ids) for a task drawn from ``tasks`` (name -> weight): ASR+X, the
    transcript, then the task's tags from ``item``, then ``eos``."""
    from ..inference import slot_ids

    names, weights = zip(*tasks.items())
    tagged = [(n, w) for n, w in zip(names, weights) if get_task(n).tags]
    plain = [(n, w) for n, w in zip(names, weights) if not get_task(n).tags]
    if item["id"].startswith("real/") and real_weight != 1.0 and tagged and plain:
        # real recordings come real_weight times as often for their voices, not for their tags
        # (the one real speaker is female: weighting her tags up would teach "real = female"):
        # a tagged task with 1/real_weight of its usual chance, so as many tagged examples as before
        p_tag = min(1.0, sum(w for _, w in tagged) / sum(weights) / real_weight)
        names, weights = zip(*(tagged if rng.random() < p_tag else plain))
    task = get_task(rng.choices(names, weights)[0])
    target = tok.encode(item["text"], add_special_tokens=False)
    for slot, kind in enumerate(task.tags):
        target += slot_ids(tok, task, slot, item[kind])
    return tok.encode(task.prompt, add_special_tokens=False), target + [eos]


def llm_loss(model: OsumModel, speech: torch.Tensor, lengths: torch.Tensor,
             pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy of each row's targets through the LLM: ``pairs`` holds (prompt,
    targets) per row of ``speech`` (B, L, d), laid out as :meth:`OsumModel.splice` does. Rows
    that share a prompt (a task) run the prompt once and share its keys and values (~1/5 of the
    tokens of a batch of 8 otherwise); the rest of each row is spliced after it. Same loss and
    gradients as splicing each row whole (tested)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, (prompt, _) in enumerate(pairs):
        groups.setdefault(tuple(prompt), []).append(b)
    hidden, labels = [], []
    for prompt, rows in groups.items():
        targets = [pairs[b][1] for b in rows]
        hidden.append(shared_prompt_hidden(model, list(prompt), speech[rows], lengths[rows], targets))
        labels += [t for ts in targets for t in ts]
    logits = model.llm.lm_head(torch.cat(hidden)).float()  # one pass over the 152k-word output layer
    return F.cross_entropy(logits, torch.tensor(labels, device=speech.device))


def shared_prompt_hidden(model: OsumModel, prompt: list[int], speech: torch.Tensor, lengths: torch.Tensor,
                         targets: list[list[int]]) -> torch.Tensor:  # fmt: skip
    """The LLM's last hidden states at the positions that predict ``targets`` (all rows' in
    order, (n, d)), for rows of ``speech`` that share ``prompt``."""
    from ..decoding import new_cache

    dev = speech.device
    llm, G, P = model.llm, len(targets), len(prompt)
    kv = new_cache(llm)
    llm.model(inputs_embeds=llm.get_input_embeddings()(torch.tensor([prompt], device=dev)),
              position_ids=torch.arange(P, device=dev)[None], cache=kv, use_cache=True)  # fmt: skip
    kv.batch_repeat_interleave(G)  # (1, ...) -> (G, ...), gradients summed back into the one prompt pass
    rest = model.splice([[] for _ in range(G)], speech, lengths, targets)  # [speech-begin, speech, speech-end, targets]
    mask = torch.cat([rest.attention_mask.new_ones(G, P), rest.attention_mask], dim=1)
    hidden = llm.model(inputs_embeds=rest.embeds, attention_mask=mask, position_ids=rest.position_ids + P,
                       cache=kv, use_cache=True).last_hidden_state  # fmt: skip
    S = hidden.shape[1]  # rows end at S: each row's targets are its last len(t) positions
    rows = [b for b, t in enumerate(targets) for _ in t]
    cols = [c for t in targets for c in range(S - len(t) - 1, S - 1)]
    return hidden[torch.tensor(rows), torch.tensor(cols)]
