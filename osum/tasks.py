"""OSUM's tasks: prompts and label sets verbatim, and the parser of the model's output.

OSUM is prompted per task with raw Chinese instruction text (no chat template) and
answers ``transcript<tag>`` ("ASR+X"): the transcript, then lowercase tags, no
separator. SRWT marks each word with ``<start end>`` times and STTC separates the
transcript from the reply with ``<开始回答>``.

The parser never guesses: a tag outside the task's label set is kept with
``valid=False`` and a problem is recorded, as is a missing or extra tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UnknownTaskError

__all__ = [
    "AGES",
    "EMOTIONS",
    "EVENTS",
    "GENDERS",
    "LABELS",
    "STTC_SEPARATOR",
    "STYLES",
    "TASKS",
    "ParsedOutput",
    "Tag",
    "Task",
    "Word",
    "get_task",
    "parse_output",
]  # fmt: skip

# Label vocabularies, verbatim from OSUM (lowercase, as OSUM's text normaliser writes them).
EMOTIONS = ("sad", "anger", "neutral", "happy", "surprise", "fear", "disgust", "other")
EVENTS = ("laugh", "cough", "cry", "screaming", "sigh", "throat clearing", "sneeze", "other")
STYLES = ("新闻科普", "恐怖故事", "童话故事", "客服", "诗歌散文", "有声书", "日常口语", "其他")
GENDERS = ("female", "male")
AGES = ("child", "adult", "old")
LABELS: dict[str, tuple[str, ...]] = {
    "event": EVENTS,
    "emotion": EMOTIONS,
    "style": STYLES,
    "gender": GENDERS,
    "age": AGES,
}
# OSUM's own inference maps its older age classes onto "adult" (EChat processor, gradio demo).
_LABEL_ALIASES = {"age": {"youth": "adult", "middle_age": "adult", "middle": "adult"}}
STTC_SEPARATOR = "<开始回答>"


@dataclass(frozen=True)
class Task:
    """One prompt of OSUM and the shape of its answer."""

    name: str  # our API name
    key: str  # OSUM's task key (never fed to the model)
    prompt: str  # the instruction text fed to the model, verbatim
    transcript: bool = True  # the answer starts with the transcript
    tags: tuple[str, ...] = ()  # tag kinds that follow, in order
    tag_separator: str = ""  # between consecutive tags
    timestamps: bool = False  # SRWT
    chat: bool = False  # STTC
    aliases: tuple[str, ...] = ()

    def token_budget(self, seconds: float) -> int | None:
        """The most tokens a sane answer to this task has for ``seconds`` of speech, or None
        (a reply's length does not follow the audio's). A guard against runaway decoding: a
        model that loops or never writes the end token stops here instead of at
        max_new_tokens. Speech runs ~3-5 Qwen tokens a second: of osum-mini's 12,450 training
        transcripts (real and synthetic) none has more than 5 a second + 16, the median is 3.6
        a second, the 99.9th percentile 7.1 (short prompts); 6 + 16 leaves room above all of
        them while a runaway loop stops at ~1.5x a fast reading instead of ~2.5x. Word
        timestamps add about three tokens a word; tags a few tokens at the end."""
        if self.chat:
            return None
        return int(seconds * (40 if self.timestamps else 6)) + 16


_TASK_LIST = (
    Task("asr", "<TRANSCRIBE>", "执行语音识别任务，将音频转换为文字。", aliases=("transcribe",)),
    Task(
        "srwt", "<TRANSCRIBE> <ALIGN>",
        "请转录音频内容，并为每个英文词汇及其对应的中文翻译标注出精确到0.1秒的起止时间，时间范围用<>括起来。",
        timestamps=True, aliases=("timestamps", "align"),
    ),
    Task(
        "ved", "<TRANSCRIBE> <CAPTION>",
        "请将音频转录为文字记录，并在记录末尾标注<音频事件>标签，音频事件共8种：laugh，cough，cry，screaming，sigh，throat clearing，sneeze，other。",
        tags=("event",), aliases=("events", "event"),
    ),
    Task(
        "ser", "<TRANSCRIBE> <EMOTION>",
        "请将音频内容转录成文字记录，并在记录末尾标注<情感>标签，情感共8种：sad，anger，neutral，happy，surprise，fear，disgust，和other。",
        tags=("emotion",), aliases=("emotion",),
    ),
    Task(
        "ssr", "<TRANSCRIBE> <STYLE>",
        "请将音频内容进行文字转录，并在最后添加<风格>标签，标签共8种：新闻科普、恐怖故事、童话故事、客服、诗歌散文、有声书、日常口语、其他。",
        tags=("style",), aliases=("style",),
    ),
    Task(
        "sgc", "<TRANSCRIBE> <GENDER>", "请将音频转录为文本，并在文本结尾处标注<性别>标签，性别为female或male。",
        tags=("gender",), aliases=("gender",),
    ),
    Task(
        "sap", "<TRANSCRIBE> <AGE>", "请将音频转录为文本，并在文本结尾处标注<年龄>标签，年龄划分为child、adult和old三种。",
        tags=("age",), aliases=("age",),
    ),
    Task(
        "sttc", "<TRANSCRIBE> <S2TCHAT>", "首先将语音转录为文字，然后对语音内容进行回复，转录和文字之间使用<开始回答>分割。",
        chat=True, aliases=("chat",),
    ),
    # combined tasks of the release (prompts verbatim, including the original's typo "以d下")
    Task(
        "asr+age+gender", "<TRANSCRIBE> <AGE> <GENDER>",
        "请将这段音频进行转录，并在转录完成的文本末尾附加<年龄> <性别>标签。年龄分为child、adult、old三种，性别为female或male。",
        tags=("age", "gender"), tag_separator=" ",
    ),
    Task(
        "age+gender", "<AGE> <GENDER>",
        "请识别以d下音频发言者的年龄和性别。年龄分为child、adult、old三种，性别为male和female。",
        transcript=False, tags=("age", "gender"), tag_separator=" ",
    ),
    Task(
        "asr+style+age+gender", "<TRANSCRIBE> <STYLE> <AGE> <GENDER>",
        "请对以下音频内容进行转录，并在文本结尾分别添加<风格>、<年龄>、<性别>标签。风格有8种类型：新闻科普、恐怖故事、童话故事、客服、诗歌散文、有声书、日常口语、其他。年龄划分为child、adult、old三个阶段，性别则为male和female。",
        tags=("style", "age", "gender"), tag_separator=" ",
    ),
    Task(
        "style+age+gender", "<STYLE> <AGE> <GENDER>",
        "请对以下音频进行分析，识别说话风格、说话者年龄和性别。风格类型有8种，包括新闻科普、恐怖故事、童话故事、客服、诗歌散文、有声书、日常口语、其他。年龄阶段为child、adult、old三种，性别为male或female。",
        transcript=False, tags=("style", "age", "gender"), tag_separator=" ",
    ),
)  # fmt: skip

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
_BY_ALIAS = {a: t for t in _TASK_LIST for a in (t.name, t.key.lower(), *t.aliases)}


def get_task(name: str) -> Task:
    """Look a task up by name (``ser``), alias (``emotion``) or OSUM key (``<TRANSCRIBE> <EMOTION>``)."""
    task = _BY_ALIAS.get(name.strip().lower())
    if task is None:
        raise UnknownTaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class Tag:
    kind: str  # emotion, event, style, gender, age
    label: str  # normalised label, or the raw text when not valid
    valid: bool = True  # False: the model wrote something outside the label set
    score: float | None = None  # closed-set probability of ``label`` among the task's labels
    scores: dict[str, float] | None = None  # every label's probability, when scored


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds from the utterance start
    end: float


@dataclass(frozen=True)
class ParsedOutput:
    task: str
    raw: str  # the model's text, as generated
    transcript: str | None
    tags: tuple[Tag, ...] = ()
    words: tuple[Word, ...] | None = None
    answer: str | None = None  # STTC's reply
    problems: tuple[str, ...] = field(default=())


_TRAILING_TAGS = re.compile(r"((?:\s*<[^<>]*>)+)\s*$")
_ONE_TAG = re.compile(r"<([^<>]*)>")
_TIME_MARK = re.compile(r"<\s*([0-9]+(?:\.[0-9]+)?)\s*[-,~ ]\s*([0-9]+(?:\.[0-9]+)?)\s*>")


def normalize_label(kind: str, raw: str) -> tuple[str, bool]:
    """Map a tag's text to its label: (label, True), or (raw text, False) if not in the set."""
    label = raw.strip().lower()
    label = _LABEL_ALIASES.get(kind, {}).get(label, label)
    return (label, True) if label in LABELS[kind] else (raw.strip(), False)


def parse_output(task: Task, text: str) -> ParsedOutput:
    """Turn the model's text for ``task`` into a typed result; problems are listed, never hidden."""
    if task.chat:
        return _parse_chat(task, text)
    if task.timestamps:
        return _parse_timestamps(task, text)
    problems: list[str] = []
    body, found = text, []
    m = _TRAILING_TAGS.search(text)
    if m:
        body, found = text[: m.start()], _ONE_TAG.findall(m.group(1))
    tags: list[Tag] = []
    for i, kind in enumerate(task.tags):
        if i >= len(found):
            problems.append(f"missing {kind} tag")
            continue
        label, ok = normalize_label(kind, found[i])
        if not ok:
            problems.append(f"unknown {kind} tag <{found[i]}>")
        tags.append(Tag(kind, label, valid=ok))
    if len(found) > len(task.tags):
        extra = "".join(f"<{f}>" for f in found[len(task.tags) :])
        problems.append(f"unexpected tag(s) {extra}")
    transcript: str | None = body.strip()
    if not task.transcript:
        if transcript:
            problems.append(f"unexpected text before the tags: {transcript!r}")
        transcript = None
    return ParsedOutput(task.name, text, transcript, tuple(tags), problems=tuple(problems))


def _parse_chat(task: Task, text: str) -> ParsedOutput:
    if STTC_SEPARATOR not in text:
        return ParsedOutput(task.name, text, text.strip(), problems=(f"missing {STTC_SEPARATOR} separator",))
    transcript, answer = text.split(STTC_SEPARATOR, 1)
    problems = (f"more than one {STTC_SEPARATOR} separator",) if STTC_SEPARATOR in answer else ()
    return ParsedOutput(task.name, text, transcript.strip(), answer=answer.strip(), problems=problems)


def _parse_timestamps(task: Task, text: str) -> ParsedOutput:
    """``word<0.3 0.7>word<0.8 1.2>``: each word followed by its start and end in seconds."""
    words: list[Word] = []
    problems: list[str] = []
    pos = 0
    for m in _TIME_MARK.finditer(text):
        word = _ONE_TAG.sub("", text[pos : m.start()]).strip()
        start, end = float(m.group(1)), float(m.group(2))
        if not word:
            problems.append(f"time mark {m.group(0)} has no word")
        elif end < start:
            problems.append(f"time mark {m.group(0)} ends before it starts")
        else:
            words.append(Word(word, start, end))
        pos = m.end()
    rest = text[pos:]
    leftovers = _ONE_TAG.findall(rest)
    if leftovers or (rest.strip() and words):
        problems.append(f"text without a valid time mark: {rest.strip()!r}")
    bad = [t for t in _ONE_TAG.findall(text) if not _TIME_MARK.fullmatch(f"<{t}>")]
    if bad and not leftovers:
        problems.append("malformed time mark(s): " + ", ".join(f"<{b}>" for b in bad))
    transcript = " ".join(w.text for w in words) if words else _ONE_TAG.sub("", text).strip()
    if not words:
        problems.append("no word time marks")
    return ParsedOutput(task.name, text, transcript, words=tuple(words), problems=tuple(problems))
