from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from osum.errors import UnknownTaskError
from osum.tasks import AGES, EMOTIONS, EVENTS, LABELS, STTC_SEPARATOR, STYLES, TASKS, get_task, parse_output


def test_prompts_and_labels_verbatim() -> None:
    assert get_task("asr").prompt == "执行语音识别任务，将音频转换为文字。"
    assert get_task("sgc").prompt == "请将音频转录为文本，并在文本结尾处标注<性别>标签，性别为female或male。"
    assert get_task("sttc").prompt == "首先将语音转录为文字，然后对语音内容进行回复，转录和文字之间使用<开始回答>分割。"
    assert get_task("age+gender").prompt.startswith("请识别以d下音频")  # the release's own typo
    assert EMOTIONS == ("sad", "anger", "neutral", "happy", "surprise", "fear", "disgust", "other")
    assert EVENTS == ("laugh", "cough", "cry", "screaming", "sigh", "throat clearing", "sneeze", "other")
    assert STYLES == ("新闻科普", "恐怖故事", "童话故事", "客服", "诗歌散文", "有声书", "日常口语", "其他")
    assert AGES == ("child", "adult", "old")
    assert len(TASKS) == 12
    for t in TASKS.values():  # every label set a prompt enumerates is the one we score
        for kind in t.tags:
            for label in LABELS[kind]:
                assert label in t.prompt


def test_lookup_by_name_alias_and_key() -> None:
    assert get_task("emotion") is get_task("ser") is get_task("<TRANSCRIBE> <EMOTION>")
    with pytest.raises(UnknownTaskError, match="unknown task 'karaoke'"):
        get_task("karaoke")


def test_parse_tagged() -> None:
    p = parse_output(get_task("ser"), "i am fine thanks<happy>")
    assert p.transcript == "i am fine thanks" and p.tags[0].label == "happy" and p.tags[0].valid and not p.problems
    p = parse_output(get_task("ved"), "ahem<Throat Clearing>")
    assert p.tags[0].label == "throat clearing"


def test_unknown_missing_and_extra_tags_are_reported() -> None:
    p = parse_output(get_task("ser"), "hello<furious>")
    assert p.transcript == "hello" and not p.tags[0].valid and p.tags[0].label == "furious"
    assert p.problems == ("unknown emotion tag <furious>",)
    p = parse_output(get_task("ser"), "hello there")
    assert p.tags == () and p.problems == ("missing emotion tag",) and p.transcript == "hello there"
    p = parse_output(get_task("sgc"), "hi<male><sad>")
    assert p.tags[0].label == "male" and p.problems == ("unexpected tag(s) <sad>",)


def test_combined_tasks() -> None:
    p = parse_output(get_task("asr+age+gender"), "good morning<adult> <female>")
    assert p.transcript == "good morning" and [t.label for t in p.tags] == ["adult", "female"]
    p = parse_output(get_task("style+age+gender"), "<客服> <old> <male>")
    assert p.transcript is None and [t.kind for t in p.tags] == ["style", "age", "gender"] and not p.problems
    p = parse_output(get_task("age+gender"), "<youth> <male>")  # OSUM's own older class, mapped as OSUM maps it
    assert p.tags[0].label == "adult" and p.tags[0].valid


def test_srwt_and_sttc() -> None:
    p = parse_output(get_task("srwt"), "hello<0.3 0.7>world<0.8-1.2>")
    assert [(w.text, w.start, w.end) for w in p.words or ()] == [("hello", 0.3, 0.7), ("world", 0.8, 1.2)]
    assert p.transcript == "hello world" and not p.problems
    p = parse_output(get_task("srwt"), "hello<0.9 0.2>world")
    assert "ends before it starts" in p.problems[0]
    p = parse_output(get_task("sttc"), f"how are you{STTC_SEPARATOR}i am well")
    assert p.transcript == "how are you" and p.answer == "i am well"
    p = parse_output(get_task("sttc"), "how are you")
    assert p.answer is None and p.problems == (f"missing {STTC_SEPARATOR} separator",)


@given(st.text(max_size=80), st.sampled_from(sorted(TASKS)))
def test_parser_never_raises_and_keeps_the_raw_text(text: str, name: str) -> None:
    p = parse_output(get_task(name), text)
    assert p.raw == text


@given(st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=40), st.sampled_from(EMOTIONS))
def test_valid_outputs_round_trip(transcript: str, label: str) -> None:
    p = parse_output(get_task("ser"), f"{transcript}<{label}>")
    assert p.transcript == transcript.strip() and p.tags[0].label == label and not p.problems
