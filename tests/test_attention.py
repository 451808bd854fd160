"""``osum_rows`` attention: a draft verified in one pass gives, bit for bit, the logits and
cache of decoding it one token a call (the int8 LLM, where last bits become other words)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from osum.attention import ROWS, rows_singly_from
from osum.decoding import new_cache


@pytest.fixture(scope="module")
def tiny_int8():  # type: ignore[no-untyped-def]
    from osum.loading import load_model

    return load_model("tiny", quantize="int8")


def _one_pass_and_steps(llm, embeds: torch.Tensor, first: int, rows: bool) -> tuple[torch.Tensor, torch.Tensor, list, list]:  # type: ignore[no-untyped-def,type-arg]
    """Logits of positions first-1.. from one pass over ``embeds`` and from a pass over
    ``embeds[:first]`` then one position a call; and both caches' keys."""
    n = embeds.shape[1]
    with torch.inference_mode():
        kv = new_cache(llm)
        with rows_singly_from(first) if rows else contextlib.nullcontext():
            one = llm(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long), position_ids=torch.arange(n)[None],
                      cache=kv, use_cache=True, logits_to_keep=n - first + 1).logits[0]  # fmt: skip
        kv2 = new_cache(llm)
        steps = [llm(inputs_embeds=embeds[:, :first], attention_mask=torch.ones(1, first, dtype=torch.long),
                     position_ids=torch.arange(first)[None], cache=kv2, use_cache=True, logits_to_keep=1).logits[0, -1]]  # fmt: skip
        for p in range(first, n):
            steps.append(llm(inputs_embeds=embeds[:, p : p + 1], attention_mask=torch.ones(1, p + 1, dtype=torch.long),
                             position_ids=torch.tensor([[p]]), cache=kv2, use_cache=True).logits[0, -1])  # fmt: skip
    keys = [kv.layers[i].keys for i in range(len(kv.layers))], [kv2.layers[i].keys for i in range(len(kv2.layers))]
    return one, torch.stack(steps), *keys


def test_a_verified_draft_is_bit_identical_to_decoding_it(tiny_int8) -> None:  # type: ignore[no-untyped-def]
    llm = tiny_int8.llm
    assert llm.config._attn_implementation == ROWS  # what the int8 LLM attends with
    torch.manual_seed(0)
    embeds = llm.get_input_embeddings()(torch.randint(0, 5000, (1, 70))).float()
    one, steps, keys_one, keys_steps = _one_pass_and_steps(llm, embeds, 60, rows=True)
    assert torch.equal(one, steps)  # every draft position, to the last bit
    assert all(torch.equal(a, b) for a, b in zip(keys_one, keys_steps, strict=True))  # and the cache decoding goes on from
    # the same pass with every row among the others differs (what made int8 Finals differ from offline)
    one, steps, _, _ = _one_pass_and_steps(llm, embeds, 60, rows=False)
    assert not torch.equal(one, steps)


def test_a_session_gets_the_same_bits_in_any_batch(tiny_int8, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    """Finals of several sessions decoded in one padded batch, and tags scored together, are
    bit for bit what each gives alone (and alone is what offline recognition gives)."""
    from osum.audio import log_mel
    from osum.decoding import DecodingOptions, generate, score_continuations
    from osum.inference import recognize
    from streaming.work import FinalRequest, run_finals

    model = tiny_int8
    clips = [male_clip, female_clip[: 16000 * 2]]  # different lengths: the batch is padded
    alone = [run_finals(model, [FinalRequest(c)])[0] for c in clips]
    together = run_finals(model, [FinalRequest(c) for c in clips])
    reverse = run_finals(model, [FinalRequest(c) for c in clips[::-1]])[::-1]
    for a, t, r in zip(alone, together, reverse, strict=True):
        assert a.tokens == t.tokens == r.tokens and a.confidence is not None
        assert a.confidence == t.confidence == r.confidence  # the mean of exact log-probabilities
        assert torch.equal(a.speech, t.speech)  # the encoder, alone in both
    offline = [recognize(model, c)[0] for c in clips]
    assert [o.confidence for o in offline] == [a.confidence for a in alone]

    speech, lengths = model.encode_each([log_mel(c) for c in clips])
    prompt = model.tokenizer.encode("hello", add_special_tokens=False)
    cands = [[[11, 12], [13]], [[14], [15, 16, 17]]]
    inputs = model.splice([prompt] * 2, speech, lengths, [[5, 6, 7], [8]])
    both = score_continuations(model.llm, inputs, cands)
    each = [score_continuations(model.llm, model.splice([prompt], speech[b : b + 1], lengths[b : b + 1], [[5, 6, 7], [8]][b : b + 1]),
                                cands[b : b + 1])[0] for b in range(2)]  # fmt: skip
    assert both == each

    # a draft verified row by row (rows_singly_from) in a padded batch: each row as alone
    drafts = [[21, 22, 23], [24, 25, 26]]  # the same length: the draft rows end every row
    verify = model.splice([prompt] * 2, speech, lengths, drafts)
    S, P = verify.embeds.shape[1], len(drafts[0])
    with torch.inference_mode(), rows_singly_from(S - P):
        both_rows = model.llm(inputs_embeds=verify.embeds, attention_mask=verify.attention_mask,
                              position_ids=verify.position_ids, logits_to_keep=P + 1).logits  # fmt: skip
    for b in range(2):
        one = model.splice([prompt], speech[b : b + 1], lengths[b : b + 1], drafts[b : b + 1])
        with torch.inference_mode(), rows_singly_from(one.embeds.shape[1] - P):
            alone_rows = model.llm(inputs_embeds=one.embeds, attention_mask=one.attention_mask,
                                   position_ids=one.position_ids, logits_to_keep=P + 1).logits  # fmt: skip
        assert torch.equal(both_rows[b], alone_rows[0])

    # decoding a padded batch gives each row its own bits. (transformers' eager attention over
    # the same batch differs on the AVX2 machines this was written on, which is why per-row
    # attention exists; on an AVX-512 machine it happened to agree, so that contrast is a
    # property of the CPU's kernels, not asserted here.)
    opt = DecodingOptions(max_new_tokens=8)
    plain = model.splice([prompt] * 2, speech, lengths)
    assert generate(model.llm, plain, opt, -1)[1].token_logprobs == alone_lps(model, speech[1:], lengths[1:], prompt, opt)


def alone_lps(model, speech: torch.Tensor, lengths: torch.Tensor, prompt: list[int], opt) -> list[float]:  # type: ignore[no-untyped-def]
    from osum.decoding import generate

    return generate(model.llm, model.splice([prompt], speech, lengths), opt, -1)[0].token_logprobs
