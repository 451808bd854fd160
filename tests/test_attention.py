"""``osum_rows`` attention: a draft verified in one pass gives, bit for bit, the logits and
cache of decoding it one token a call (the int8 LLM, where last bits become other words)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from osum.attention import ROWS, rows_singly_from
from osum.decoding import _new_cache


@pytest.fixture(scope="module")
def tiny_int8():  # type: ignore[no-untyped-def]
    from osum.loading import load_model

    return load_model("tiny", quantize="int8")


def _one_pass_and_steps(llm, embeds: torch.Tensor, first: int, rows: bool) -> tuple[torch.Tensor, torch.Tensor, list, list]:  # type: ignore[no-untyped-def,type-arg]
    """Logits of positions first-1.. from one pass over ``embeds`` and from a pass over
    ``embeds[:first]`` then one position a call; and both caches' keys."""
    n = embeds.shape[1]
    with torch.inference_mode():
        kv = _new_cache(llm)
        with rows_singly_from(first) if rows else contextlib.nullcontext():
            one = llm(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long), position_ids=torch.arange(n)[None],
                      cache=kv, use_cache=True, logits_to_keep=n - first + 1).logits[0]  # fmt: skip
        kv2 = _new_cache(llm)
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
