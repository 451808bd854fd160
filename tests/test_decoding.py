"""Decoding on the tiny model with real speech: greedy, beam, batching, stops, sampling, scoring."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osum.audio import log_mel
from osum.decoding import DecodingOptions, generate, score_continuations
from osum.errors import InvalidConfigError
from osum.inference import pad_mels
from osum.tasks import get_task

SHORT = DecodingOptions(max_new_tokens=12)


def _inputs(model, clips: list[np.ndarray], text: list[list[int]] | None = None):  # type: ignore[no-untyped-def]
    mel, lengths = pad_mels([log_mel(c) for c in clips])
    speech, speech_len = model.encode_speech(mel, lengths)
    prompt = model.tokenizer.encode(get_task("ser").prompt, add_special_tokens=False)
    return model.splice([prompt] * len(clips), speech, speech_len, text)


def test_greedy_equals_beam_of_one(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    inp = _inputs(tiny_model, [male_clip, female_clip])
    greedy = generate(tiny_model.llm, inp, SHORT, eos_id=151643)
    beam1 = generate(tiny_model.llm, inp, dataclasses.replace(SHORT, beam_size=1), eos_id=151643)
    assert [h.tokens for h in greedy] == [h.tokens for h in beam1]
    # the beam implementation itself, at width 1, is greedy too
    from osum.decoding import _beam

    assert [h.tokens for h in _beam(tiny_model.llm, inp, SHORT, 151643)] == [h.tokens for h in greedy]


@pytest.mark.parametrize("beam", [1, 3])
def test_batch_equals_one_by_one(tiny_model, male_clip, female_clip, beam: int) -> None:  # type: ignore[no-untyped-def]
    opt = dataclasses.replace(SHORT, beam_size=beam)
    clips = [male_clip, female_clip[:20000], male_clip[8000:30000]]
    batched = generate(tiny_model.llm, _inputs(tiny_model, clips), opt, 151643)
    for clip, h in zip(clips, batched):
        single = generate(tiny_model.llm, _inputs(tiny_model, [clip]), opt, 151643)[0]
        assert single.tokens == h.tokens
        assert single.logprob == pytest.approx(h.logprob, abs=1e-3)


def test_stops_at_eos_and_at_max_tokens(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    inp = _inputs(tiny_model, [male_clip])
    free = generate(tiny_model.llm, inp, SHORT, eos_id=151643)[0]
    assert len(free.tokens) == 12 and not free.finished  # the random model never says eos
    # make the 5th generated token the stop token: decoding must end just before it
    stop = free.tokens[4]
    first = free.tokens.index(stop)
    ended = generate(tiny_model.llm, inp, SHORT, eos_id=stop)[0]
    assert ended.finished and ended.tokens == free.tokens[:first]
    beamed = generate(tiny_model.llm, inp, dataclasses.replace(SHORT, beam_size=2), eos_id=stop)[0]
    assert stop not in beamed.tokens


def test_beam_finds_at_least_the_greedy_score(tiny_model, female_clip) -> None:  # type: ignore[no-untyped-def]
    inp = _inputs(tiny_model, [female_clip])
    opt = dataclasses.replace(SHORT, max_new_tokens=6, length_penalty=0.0)
    g = generate(tiny_model.llm, inp, opt, 151643)[0]
    b = generate(tiny_model.llm, inp, dataclasses.replace(opt, beam_size=4), 151643)[0]
    assert b.logprob >= g.logprob - 1e-4


def test_sampling_is_seeded(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    inp = _inputs(tiny_model, [male_clip])
    opt = dataclasses.replace(DecodingOptions.osum_paper(seed=5), max_new_tokens=8)
    a = generate(tiny_model.llm, inp, opt, 151643)[0].tokens
    assert a == generate(tiny_model.llm, inp, opt, 151643)[0].tokens
    plain = dataclasses.replace(opt, beam_size=1, top_k=0, top_p=1.0, temperature=5.0)
    draws = {tuple(generate(tiny_model.llm, inp, dataclasses.replace(plain, seed=s), 151643)[0].tokens) for s in range(3)}
    assert len(draws) > 1  # sampling does sample


def test_scores_equal_a_full_teacher_forced_pass(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    tok = tiny_model.tokenizer
    prefix = [tok.encode("and you", add_special_tokens=False), []]
    cands = [[tok.encode("<sad>"), tok.encode("<throat clearing>") + [151643]], [tok.encode("<happy>")]]
    inp = _inputs(tiny_model, [male_clip, female_clip], prefix)
    got = score_continuations(tiny_model.llm, inp, cands)
    for b in range(2):
        for c, value in zip(cands[b], got[b]):
            full = _inputs(tiny_model, [[male_clip, female_clip][b]], [prefix[b] + c])
            with torch.no_grad():
                logits = tiny_model.llm(inputs_embeds=full.embeds, position_ids=full.position_ids).logits[0]
            lp = F.log_softmax(logits.float(), -1)
            n = len(c)
            expected = sum(float(lp[-n - 1 + i, t]) for i, t in enumerate(c))
            assert value == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    "kwargs", [dict(beam_size=0), dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1), dict(repetition_penalty=0)]
)
def test_options_are_validated(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidConfigError):
        DecodingOptions(**kwargs)


def test_loop_cut_finds_runaway_loops_not_speech() -> None:
    from osum.decoding import first_loop_cut, loop_cut

    ab = [7, 8] * 8  # "decimal," 8 times: 16 tokens
    assert loop_cut([1, 2, 3, *ab]) == 5  # keeps one copy
    assert loop_cut([1, 2, 3, *ab[:-2]]) is None  # 7 times: 14 tokens, not yet
    assert loop_cut([5] * 16) == 1 and loop_cut([5] * 15) is None  # one token needs 16 in a row
    phrase = list(range(10, 18))  # an 8-token phrase: 4 times is a loop, 3 times is speech
    assert loop_cut(phrase * 4) == 8 and loop_cut(phrase * 3) is None
    assert loop_cut([3, 4, 3, 4, 3, 4]) is None  # "no, no, no"
    cycle = [*range(20, 29), 3, *range(20, 29), 4]  # two menu lines alternating: a 20-token cycle
    assert loop_cut([1, *cycle * 4]) == 21 and loop_cut([1, *cycle * 3]) is None
    # the first place a loop completes, as token-by-token decoding meets it
    assert first_loop_cut([9, *ab, 9, 9]) == 3 and first_loop_cut([1, 2, 3]) is None
    assert first_loop_cut([9, *ab], start=17) is None  # only lengths past start are checked
