"""Model directories, the tiny model, and OSUM's released checkpoint layout (at tiny sizes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from osum.audio import log_mel
from osum.errors import CheckpointError, ModelNotFoundError
from osum.loading import load_model, save_model
from osum.released import load_osum_checkpoint

from .release_checkpoint import write_release


def _speech(model, clip: np.ndarray) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model.encode_speech(log_mel(clip)[None])[0]


def _logits(model, clip: np.ndarray) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        speech, n = model.encode_speech(log_mel(clip)[None])
        inp = model.splice([[100, 200]], speech, n, [[300, 400]])
        return model.llm(inputs_embeds=inp.embeds, position_ids=inp.position_ids).logits


def test_model_directory_round_trip(tiny_model, tmp_path: Path, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    save_model(tiny_model, tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    assert again.cfg == tiny_model.cfg
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    torch.testing.assert_close(_logits(again, male_clip), _logits(tiny_model, male_clip))
    assert again.tokenizer.encode("执行语音识别任务") == tiny_model.tokenizer.encode("执行语音识别任务")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_release(tmp_path_factory.mktemp("release"))


def test_released_checkpoint_loads_with_lora_merged(release, male_clip: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    root, expected = release
    model = load_model(root)  # a directory holding infer.pt and the Qwen2 config + tokenizer
    assert model.cfg.encoder.d_model == 128 and model.cfg.encoder.n_heads == 2 and model.cfg.speech_token_num == 4097
    ours = model.state_dict()
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(ours[k], v, msg=k)
    torch.testing.assert_close(_logits(model, male_clip), _logits(expected, male_clip))
    # the boundary rows are 4097 / 4098 of the 4099-row table
    torch.testing.assert_close(model.boundary_embeddings()[0], expected.speech_token_emded.weight[4097])


def test_released_checkpoint_in_bf16(tmp_path: Path, male_clip: np.ndarray) -> None:
    root, expected = write_release(tmp_path / "bf16", seed=1, dtype=torch.bfloat16)
    model = load_osum_checkpoint(root / "infer.pt", root)
    assert model.llm_dtype == torch.float32  # CPU runs fp32
    torch.testing.assert_close(_speech(model, male_clip), _speech(expected, male_clip), atol=0.05, rtol=0.05)


def _rewrite(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(src, dst)
    sd = torch.load(dst / "infer.pt")
    sd = edit(sd)
    torch.save(sd, dst / "infer.pt")
    return dst


def test_truncated_checkpoint(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = release
    bad = shutil.copytree(root, tmp_path / "cut")
    data = (bad / "infer.pt").read_bytes()
    (bad / "infer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(bad)


def test_foreign_checkpoint_names_its_keys(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = release
    bad = _rewrite(root, tmp_path / "foreign", lambda sd: {"resnet.fc.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    msg = str(e.value)
    assert "unexpected 1 key(s): resnet.fc.weight" in msg
    assert "missing 474 key(s) (down_sample_2 6, encoder " in msg and "speech_transformer " in msg and ", llm " in msg


def test_missing_and_misshapen_keys_are_named(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = release

    def edit(sd):  # type: ignore[no-untyped-def]
        del sd["encoder.encoders.1.feed_forward.w_2.bias"]
        sd["speech_llama_proj.weight"] = torch.zeros(64, 32)
        return sd

    with pytest.raises(CheckpointError) as e:
        load_model(_rewrite(root, tmp_path / "broken", edit))
    msg = str(e.value)
    assert "missing 1 key(s) (encoder 1): encoder.encoders.1.feed_forward.w_2.bias" in msg
    assert "speech_llama_proj.weight: checkpoint (64, 32), model (64, 64)" in msg


def test_half_a_lora_pair_is_an_error(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = release
    key = "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    bad = _rewrite(root, tmp_path / "lora", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match="LoRA A/B pairs incomplete"):
        load_model(bad)


def test_not_a_state_dict(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    root, _ = release
    bad = shutil.copytree(root, tmp_path / "list")
    torch.save([1, 2, 3], bad / "infer.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_model(bad)
    (bad / "infer.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_model(bad)


def test_missing_llm_config(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = release
    with pytest.raises(ModelNotFoundError, match="no Qwen2 config.json"):
        load_osum_checkpoint(root / "infer.pt", tmp_path)


def test_names_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model named or at"):
        load_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="osum prepare osum-mini"):
        load_model("osum-mini")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        load_model(tmp_path / "empty")


def test_corrupt_model_directory(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = save_model(tiny_model, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_model(d)


def test_the_name_osum_resolves_in_the_cache(release, tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    root, expected = release
    monkeypatch.setenv("OSUM_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without the hub sees, at once
    with pytest.raises(ModelNotFoundError, match="hub is unreachable") as e:
        load_model("osum")
    assert str(tmp_path / "osum") in str(e.value)
    shutil.copytree(root, tmp_path / "osum")  # infer.pt beside the Qwen2 config and tokenizer
    model = load_model("osum")
    torch.testing.assert_close(model.state_dict()["speech_llama_proj.weight"], expected.state_dict()["speech_llama_proj.weight"])
    shutil.rmtree(tmp_path / "osum")
    save_model(tiny_model, tmp_path / "osum")  # an imported model directory
    assert load_model("osum").cfg == tiny_model.cfg


def test_building_on_meta_skips_initialisers_for_meta_tensors_only() -> None:
    from osum.loading import params_on_meta

    normal = torch.nn.init.normal_
    with params_on_meta():
        layer = torch.nn.Linear(4, 3)
        real = torch.nn.init.normal_(torch.zeros(1000))  # a buffer a module fills: still filled
    assert layer.weight.is_meta and layer.bias.is_meta
    assert 0.8 < float(real.std()) < 1.2
    assert torch.nn.init.normal_ is normal  # put back
