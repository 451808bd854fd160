from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecognitionConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate_hertz", "audio_channel_count", "language_code", "model", "analysis_tasks", "enable_chat_reply", "endpointing_config", "enable_word_time_offsets")
    class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[RecognitionConfig.AudioEncoding]
        LINEAR16: _ClassVar[RecognitionConfig.AudioEncoding]
        FLOAT32: _ClassVar[RecognitionConfig.AudioEncoding]
    ENCODING_UNSPECIFIED: RecognitionConfig.AudioEncoding
    LINEAR16: RecognitionConfig.AudioEncoding
    FLOAT32: RecognitionConfig.AudioEncoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHANNEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_TASKS_FIELD_NUMBER: _ClassVar[int]
    ENABLE_CHAT_REPLY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ENABLE_WORD_TIME_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    encoding: RecognitionConfig.AudioEncoding
    sample_rate_hertz: int
    audio_channel_count: int
    language_code: str
    model: str
    analysis_tasks: _containers.RepeatedScalarFieldContainer[str]
    enable_chat_reply: bool
    endpointing_config: EndpointingConfig
    enable_word_time_offsets: bool
    def __init__(self, encoding: _Optional[_Union[RecognitionConfig.AudioEncoding, str]] = ..., sample_rate_hertz: _Optional[int] = ..., audio_channel_count: _Optional[int] = ..., language_code: _Optional[str] = ..., model: _Optional[str] = ..., analysis_tasks: _Optional[_Iterable[str]] = ..., enable_chat_reply: _Optional[bool] = ..., endpointing_config: _Optional[_Union[EndpointingConfig, _Mapping]] = ..., enable_word_time_offsets: _Optional[bool] = ...) -> None: ...

class EndpointingConfig(_message.Message):
    __slots__ = ("min_silence_ms", "min_speech_ms", "max_utterance_s", "threshold", "eager_final_ms")
    MIN_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEECH_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_UTTERANCE_S_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EAGER_FINAL_MS_FIELD_NUMBER: _ClassVar[int]
    min_silence_ms: int
    min_speech_ms: int
    max_utterance_s: float
    threshold: float
    eager_final_ms: int
    def __init__(self, min_silence_ms: _Optional[int] = ..., min_speech_ms: _Optional[int] = ..., max_utterance_s: _Optional[float] = ..., threshold: _Optional[float] = ..., eager_final_ms: _Optional[int] = ...) -> None: ...

class StreamingRecognitionConfig(_message.Message):
    __slots__ = ("config", "interim_results", "partial_step_ms", "resume_token", "last_seq", "partial_context", "partial_growth")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_GROWTH_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    interim_results: bool
    partial_step_ms: int
    resume_token: str
    last_seq: int
    partial_context: str
    partial_growth: float
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., interim_results: _Optional[bool] = ..., partial_step_ms: _Optional[int] = ..., resume_token: _Optional[str] = ..., last_seq: _Optional[int] = ..., partial_context: _Optional[str] = ..., partial_growth: _Optional[float] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("kind",)
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ControlMessage.Kind]
        FINALIZE: _ClassVar[ControlMessage.Kind]
        KEEP_ALIVE: _ClassVar[ControlMessage.Kind]
    KIND_UNSPECIFIED: ControlMessage.Kind
    FINALIZE: ControlMessage.Kind
    KEEP_ALIVE: ControlMessage.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: ControlMessage.Kind
    def __init__(self, kind: _Optional[_Union[ControlMessage.Kind, str]] = ...) -> None: ...

class StreamingRecognizeRequest(_message.Message):
    __slots__ = ("streaming_config", "audio_content", "control")
    STREAMING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    streaming_config: StreamingRecognitionConfig
    audio_content: bytes
    control: ControlMessage
    def __init__(self, streaming_config: _Optional[_Union[StreamingRecognitionConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ..., control: _Optional[_Union[ControlMessage, _Mapping]] = ...) -> None: ...

class WordInfo(_message.Message):
    __slots__ = ("start_time", "end_time", "word", "confidence")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    start_time: float
    end_time: float
    word: str
    confidence: float
    def __init__(self, start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., word: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class SpeechRecognitionAlternative(_message.Message):
    __slots__ = ("transcript", "confidence", "words")
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    transcript: str
    confidence: float
    words: _containers.RepeatedCompositeFieldContainer[WordInfo]
    def __init__(self, transcript: _Optional[str] = ..., confidence: _Optional[float] = ..., words: _Optional[_Iterable[_Union[WordInfo, _Mapping]]] = ...) -> None: ...

class StreamingRecognitionResult(_message.Message):
    __slots__ = ("alternatives", "is_final", "stability", "result_start_time", "result_end_time", "utterance_id", "committed_transcript", "unstable_transcript")
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    RESULT_START_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_END_TIME_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    UNSTABLE_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    alternatives: _containers.RepeatedCompositeFieldContainer[SpeechRecognitionAlternative]
    is_final: bool
    stability: float
    result_start_time: float
    result_end_time: float
    utterance_id: int
    committed_transcript: str
    unstable_transcript: str
    def __init__(self, alternatives: _Optional[_Iterable[_Union[SpeechRecognitionAlternative, _Mapping]]] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., result_start_time: _Optional[float] = ..., result_end_time: _Optional[float] = ..., utterance_id: _Optional[int] = ..., committed_transcript: _Optional[str] = ..., unstable_transcript: _Optional[str] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("label", "score", "scores")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    scores: _containers.ScalarMap[str, float]
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Analysis(_message.Message):
    __slots__ = ("utterance_id", "tags", "reply")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Label
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Label, _Mapping]] = ...) -> None: ...
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    utterance_id: int
    tags: _containers.MessageMap[str, Label]
    reply: str
    def __init__(self, utterance_id: _Optional[int] = ..., tags: _Optional[_Mapping[str, Label]] = ..., reply: _Optional[str] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "fatal")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    fatal: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., fatal: _Optional[bool] = ...) -> None: ...

class StreamingRecognizeResponse(_message.Message):
    __slots__ = ("results", "speech_event_type", "speech_event_time", "analysis", "error", "seq", "session_id", "resume_token", "processing_latency_ms", "audio_offset", "speech_event_utterance_id", "reply_delta")
    class SpeechEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SPEECH_EVENT_UNSPECIFIED: _ClassVar[StreamingRecognizeResponse.SpeechEventType]
        SPEECH_ACTIVITY_BEGIN: _ClassVar[StreamingRecognizeResponse.SpeechEventType]
        SPEECH_ACTIVITY_END: _ClassVar[StreamingRecognizeResponse.SpeechEventType]
    SPEECH_EVENT_UNSPECIFIED: StreamingRecognizeResponse.SpeechEventType
    SPEECH_ACTIVITY_BEGIN: StreamingRecognizeResponse.SpeechEventType
    SPEECH_ACTIVITY_END: StreamingRecognizeResponse.SpeechEventType
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPEECH_EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SPEECH_EVENT_UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_DELTA_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StreamingRecognitionResult]
    speech_event_type: StreamingRecognizeResponse.SpeechEventType
    speech_event_time: float
    analysis: Analysis
    error: StreamError
    seq: int
    session_id: str
    resume_token: str
    processing_latency_ms: float
    audio_offset: float
    speech_event_utterance_id: int
    reply_delta: ReplyDelta
    def __init__(self, results: _Optional[_Iterable[_Union[StreamingRecognitionResult, _Mapping]]] = ..., speech_event_type: _Optional[_Union[StreamingRecognizeResponse.SpeechEventType, str]] = ..., speech_event_time: _Optional[float] = ..., analysis: _Optional[_Union[Analysis, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., seq: _Optional[int] = ..., session_id: _Optional[str] = ..., resume_token: _Optional[str] = ..., processing_latency_ms: _Optional[float] = ..., audio_offset: _Optional[float] = ..., speech_event_utterance_id: _Optional[int] = ..., reply_delta: _Optional[_Union[ReplyDelta, _Mapping]] = ...) -> None: ...

class ReplyDelta(_message.Message):
    __slots__ = ("utterance_id", "delta")
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    utterance_id: int
    delta: str
    def __init__(self, utterance_id: _Optional[int] = ..., delta: _Optional[str] = ...) -> None: ...

class RecognizeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class RecognizeResponse(_message.Message):
    __slots__ = ("results", "analyses")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StreamingRecognitionResult]
    analyses: _containers.RepeatedCompositeFieldContainer[Analysis]
    def __init__(self, results: _Optional[_Iterable[_Union[StreamingRecognitionResult, _Mapping]]] = ..., analyses: _Optional[_Iterable[_Union[Analysis, _Mapping]]] = ...) -> None: ...
