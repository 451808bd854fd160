"""The osum-mini training loop on the tiny configuration: both stages, resume, overlay, loading."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from osum.config import PRESETS
from osum.loading import bundled_tokenizer_dir
from osum.train.config import RunConfig
from osum.train.metrics import wer
from osum.train.trainer import Trainer

TEXTS = ["please enter your account number", "thank you for calling", "press one for sales", "goodbye"]


@pytest.fixture()
def tiny_run(tmp_path: Path, tiny_model):  # type: ignore[no-untyped-def]
    """A data dir, cached 'encoder outputs' (random, fixed per item) and a base dir with the tokenizer."""
    data, feats, base = tmp_path / "data", tmp_path / "feats", tmp_path / "base"
    data.mkdir()
    feats.mkdir()
    base.mkdir()
    g = torch.Generator().manual_seed(0)
    items, cached = [], {}
    for i, text in enumerate(TEXTS * 2):
        split = "test" if i >= len(TEXTS) else "train"
        it = {"id": f"x{i}", "text": text, "split": split, "gender": ["male", "female"][i % 2], "seconds": 1.0 + i / 10}
        items.append(it)
        cached[it["id"]] = torch.randn(40 + 4 * (i % 4), PRESETS["tiny"].encoder.d_model, generator=g).half()
    (data / "manifest.0.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    torch.save(cached, feats / "feats.0.pt")
    for f in bundled_tokenizer_dir().iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    cfg = RunConfig(stage="ctc", data=str(data), feats=str(feats), base=str(base), steps=4, batch_size=2,
                    warmup=1, eval_every=2, eval_items=4, lr=3e-3, threads=1)  # fmt: skip
    return cfg, tiny_model


def _trainer(run: Path, cfg: RunConfig, model) -> Trainer:  # type: ignore[no-untyped-def]
    import copy

    return Trainer(run, cfg, PRESETS["tiny"], llm=copy.deepcopy(model.llm))


def test_ctc_stage_trains_saves_and_resumes(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, model = tiny_run
    run = tmp_path / "run_ctc"
    t = _trainer(run, cfg, model)
    t.train(say=lambda s: None)
    assert (run / "last.pt").is_file() and (run / "best.safetensors").is_file() and (run / "loss.png").is_file()
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all("wer" in r for r in recs if r["step"] % 2 == 0)
    assert (run / "loss.png").stat().st_mtime >= (run / "log.jsonl").stat().st_mtime - 1  # plotted after the last record
    # resume: a new trainer continues at step 4 and runs to the new total
    t2 = _trainer(run, replace(cfg, steps=6), model)
    assert t2.step == 4
    torch.testing.assert_close(t2.model.speech_llama_proj.weight, t.model.speech_llama_proj.weight)
    t2.train(say=lambda s: None)
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == 6


def test_joint_stage_learns_and_exports_lora(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, model = tiny_run
    cfg = replace(cfg, stage="joint", steps=30, eval_every=30, lr=1e-2, lr_lora=1e-2, time_mask=0.0)
    run = tmp_path / "run_joint"
    t = _trainer(run, cfg, model)
    t.train(say=lambda s: None)
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["llm"] for r in recs[:5]) / 5, sum(r["llm"] for r in recs[-5:]) / 5
    assert last < first - 1.0  # nats per token: the target text is being learnt
    from safetensors.torch import load_file

    overlay = load_file(str(run / "best.safetensors"))
    assert any(k.endswith("q_proj.lora_A.default.weight") for k in overlay)
    assert "speech_token_emded.weight" in overlay and not any(k.startswith("encoder.") for k in overlay)


def test_joint_stage_keeps_a_moving_average_and_ships_it(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``ema``: evaluation and best.safetensors use the average, training the live weights; the
    average survives a resume. ``ctc_weight`` 0: the CTC head is not run at all."""
    from safetensors.torch import load_file

    cfg, model = tiny_run
    cfg = replace(cfg, stage="joint", steps=6, eval_every=6, lr=1e-2, lr_lora=1e-2, ctc_weight=0.0, ema=0.8)
    run = tmp_path / "run_ema"
    t = _trainer(run, cfg, model)
    start = t.model.speech_llama_proj.weight.detach().clone()
    t.train(say=lambda s: None)
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all("ctc" not in r and r["loss"] == r["llm"] for r in recs)
    live = t.model.speech_llama_proj.weight.detach()
    k = next(i for i, p in enumerate(t._trained) if p is t.model.speech_llama_proj.weight)
    avg = t.ema[k]
    assert not torch.equal(avg, live) and not torch.equal(avg, start)  # between the start and the live weights
    assert (avg - start).norm() < (live - start).norm()
    torch.testing.assert_close(load_file(str(run / "best.safetensors"))["speech_llama_proj.weight"], avg)
    # the last evaluated step (the one a run ships without choosing on the test prompts)
    from safetensors import safe_open

    from osum.train.export import export_overlay

    torch.testing.assert_close(load_file(str(run / "latest.safetensors"))["speech_llama_proj.weight"], avg)
    with safe_open(str(run / "latest.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "6" and f.metadata()["ema"] == "0.8"
    card = export_overlay(run, tmp_path / "shipped.safetensors", weights="latest")
    assert card["source"]["weights"] == "latest" and card["source"]["step"] == 6
    assert card["source"]["wer_at_export"] == pytest.approx(recs[-1]["wer"], abs=1e-4)
    torch.testing.assert_close(load_file(str(tmp_path / "shipped.safetensors"))["speech_llama_proj.weight"].float(), avg, atol=1e-3, rtol=1e-3)
    t2 = _trainer(run, replace(cfg, steps=7), model)
    torch.testing.assert_close(t2.ema[k], avg)
    torch.testing.assert_close(t2.model.speech_llama_proj.weight, live)  # resumed from the live weights
    # latest follows every evaluation, best only an improving one (none can beat a WER of 0)
    t2.best_wer = 0.0
    t2.train(say=lambda s: None)
    for name, step in (("latest", "7"), ("best", "6")):
        with safe_open(str(run / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["step"] == step, name
    with pytest.raises(ValueError, match="ema"):
        replace(cfg, ema=1.0)


def test_wer() -> None:
    assert wer(["Press one for sales."], ["press 1 for sales"]) == 0.0
    assert wer(["a b c d"], ["a x c"]) == 0.5
    from osum.train.metrics import capped_wer, exact_count

    refs, hyps = ["a b", "c d", "e f"], ["a b", "c x", "e f " + "loop " * 20]
    assert wer(refs, hyps) == 21 / 6  # the runaway dominates the corpus figure
    assert capped_wer(refs, hyps) == pytest.approx((0 + 0.5 + 1.0) / 3)
    assert exact_count(refs, hyps) == 1


def test_missed_words_split_by_vocabulary() -> None:
    from osum.train.metrics import missed_words, word_hits

    assert word_hits("a b c d".split(), "a x c".split()) == [True, False, True, False]  # b substituted, d deleted
    assert word_hits("a b".split(), "z a q b w".split()) == [True, True]  # insertions miss no reference word
    assert word_hits([], ["a"]) == [] and word_hits(["a"], []) == [False]
    got = missed_words(["Press one for sales.", "logged on"], ["press 1 for sails", "locked on on on"], {"press", "for", "on"})
    assert got == {"in": (0, 3), "out": (2, 3)}  # "one" matches "1" once normalised; sales and logged missed


def test_trained_overlay_loads_as_a_model(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What training writes is what the loader reads: base + overlay, LoRA merged."""
    from safetensors.torch import save_file

    from osum.loading import load_base_with_overlay
    from osum.train.lora import LoRALinear

    cfg, model = tiny_run
    cfg = replace(cfg, stage="joint", steps=3, eval_every=3, lr_lora=1e-2)
    run = tmp_path / "run"
    t = _trainer(run, cfg, model)
    t.train(say=lambda s: None)
    base = Path(cfg.base)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(("encoder.", "llm."))}, str(base / "base.safetensors"))
    PRESETS["tiny"].save(base / "config.json")
    (run / "best.json").write_text(json.dumps({"supported_tasks": ["asr", "sgc"]}))
    loaded = load_base_with_overlay(base, run / "best.safetensors")
    assert loaded.cfg.supported_tasks == ("asr", "sgc")
    feats = t.feats["x0"].float()[None]
    with torch.no_grad():
        t.model.eval()
        a, _ = t._speech([{"id": "x0"}], train=False)
        x = loaded.down_sample_2(feats)
        b = loaded.speech_llama_proj(loaded.speech_transformer(x, torch.tensor([x.shape[1]])))
    torch.testing.assert_close(b, a)
    q = t.model.llm.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.lora_B.weight.abs().sum() > 0
    merged = q.base.weight.float() + q.scale * q.lora_B.weight @ q.lora_A.weight
    torch.testing.assert_close(loaded.llm.model.layers[0].self_attn.q_proj.weight, merged, atol=2e-3, rtol=1e-2)


def test_joint_stage_from_a_ctc_run_matches_the_token_embedding_norm(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The cosine CTC head leaves the speech norm free; the joint stage rescales it to the text's."""
    cfg, model = tiny_run
    ctc_run = tmp_path / "ctc"
    _trainer(ctc_run, cfg, model).train(say=lambda s: None)
    joint = _trainer(tmp_path / "joint", replace(cfg, stage="joint", init=str(ctc_run)), model)
    with torch.no_grad():
        speech, lengths = joint._speech(joint.train_items, train=False)
        valid = torch.arange(speech.shape[1])[None] < lengths[:, None]
        norm = speech[valid].norm(dim=-1).mean()
        target = joint.model.llm.get_input_embeddings().weight.norm(dim=-1).mean()
    assert torch.isclose(norm, target, rtol=0.05), (norm, target)
    unscaled = _trainer(tmp_path / "joint2", replace(cfg, stage="joint", init=str(ctc_run), match_embedding_norm=False), model)
    with torch.no_grad():
        s2, _ = unscaled._speech(unscaled.train_items, train=False)
    assert not torch.isclose(s2[valid].norm(dim=-1).mean(), target, rtol=0.05)  # the rescale did it


def test_real_weight_shows_real_recordings_more_often(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, model = tiny_run
    seen = {}
    for w in (1.0, 50.0):
        t = _trainer(tmp_path / f"run{w}", replace(cfg, real_weight=w), model)
        t.train_items[0]["id"] = "real/" + t.train_items[0]["id"]  # one of the 4 training items is a real recording
        seen[w] = sum(any(it["id"].startswith("real/") for it in t._batch()) for _ in range(400)) / 400
    assert seen[1.0] < 0.4 and seen[50.0] > 0.85, seen  # uniform: in ~1 batch of 4; weighted: 50 / 53 of batches
    # ... for its voice, not its tags: a real item gets a tagged task 1/50 as often (0.4 / 50)
    real, synthetic = t.train_items[0], t.train_items[1]
    sgc = {name: sum(len(t._targets(it)[1]) > len(t.tok.encode(it["text"])) + 1 for _ in range(2000)) / 2000
           for name, it in (("real", real), ("synthetic", synthetic))}  # fmt: skip
    assert sgc["real"] < 0.03 and 0.33 < sgc["synthetic"] < 0.47, sgc
    with pytest.raises(ValueError):
        replace(cfg, real_weight=0.0)


def test_a_stop_request_saves_after_the_current_step(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What SIGTERM / SIGINT do to `python -m osum.train.trainer`: the step in progress is kept."""
    cfg, model = tiny_run
    run = tmp_path / "run_stop"
    t = _trainer(run, replace(cfg, eval_every=100), model)  # no evaluation (and no save) before the stop
    t.stop_requested = True
    said: list[str] = []
    t.train(say=said.append)
    assert t.step == 1 and "stopped at step 1" in said[-1]
    t2 = _trainer(run, cfg, model)
    assert t2.step == 1
    torch.testing.assert_close(t2.model.speech_llama_proj.weight, t.model.speech_llama_proj.weight)


def test_shared_prompt_loss_equals_splicing_each_row(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The joint loss runs each task's prompt once for its rows: same loss and gradients as
    OSUM's layout, one left-padded row per item (what inference sees)."""
    import random

    import torch.nn.functional as F

    cfg, model = tiny_run
    t = _trainer(tmp_path / "run_shared", replace(cfg, stage="joint", time_mask=0.0, tasks={"asr": 0.5, "sgc": 0.5}), model)
    t.model.eval()  # no dropout: both forms see the same function
    items = t.train_items[:4]
    speech, lengths = t._speech(items, train=False)
    proj = t.model.speech_llama_proj.weight

    def prompts(seed: int) -> set[tuple[int, ...]]:
        t.rng = random.Random(seed)
        return {tuple(t._targets(it)[0]) for it in items}

    seed = next(k for k in range(100) if len(prompts(k)) == 2)  # draws with both tasks in the batch
    t.rng = random.Random(seed)
    shared = t._llm_loss(speech, lengths, items)
    (g_shared,) = torch.autograd.grad(shared, proj, retain_graph=True)

    t.rng = random.Random(seed)  # the same task draws
    pairs = [t._targets(it) for it in items]
    assert len({tuple(p) for p, _ in pairs}) == 2  # both tasks in the batch: two shared prompts
    inp = t.model.splice([p for p, _ in pairs], speech, lengths, [y for _, y in pairs])
    hidden = t.model.llm.model(inputs_embeds=inp.embeds, attention_mask=inp.attention_mask,
                               position_ids=inp.position_ids).last_hidden_state  # fmt: skip
    S = hidden.shape[1]
    rows = [b for b, (_, y) in enumerate(pairs) for _ in y]
    cols = [c for _, y in pairs for c in range(S - len(y) - 1, S - 1)]
    labels = torch.tensor([tok for _, y in pairs for tok in y])
    spliced = F.cross_entropy(t.model.llm.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)]).float(), labels)
    (g_spliced,) = torch.autograd.grad(spliced, proj)
    torch.testing.assert_close(shared, spliced, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_shared, g_spliced, atol=1e-4, rtol=1e-3)


def test_export_ships_fp16_weights_with_a_card_that_claims_only_transcription(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The shipped overlay: fp16, loads to what training produced (fp16 rounding aside), and its
    card names the run and step, serves transcription only until `evaluate --card` measures it,
    and carries osum-mini's longest utterance (8 s), so that the export is served as the shipped
    weights are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from osum.errors import CheckpointError
    from osum.loading import describe_card, load_base_with_overlay
    from osum.train.export import export_overlay, own_card

    cfg, model = tiny_run
    cfg = replace(cfg, stage="joint", steps=3, eval_every=3, lr_lora=1e-2)
    run = tmp_path / "run"
    t = _trainer(run, cfg, model)
    t.train(say=lambda s: None)
    out = tmp_path / "ship" / "osum-mini.safetensors"
    card = export_overlay(run, out)
    assert card["supported_tasks"] == ["asr"] and card["source"]["step"] == 3 and card["measured"] is None
    assert own_card(out) == card  # `evaluate --card` records only into a card written for this very file
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert out.stat().st_size < (run / "best.safetensors").stat().st_size * 0.6

    base = Path(cfg.base)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(("encoder.", "llm."))}, str(base / "base.safetensors"))
    PRESETS["tiny"].save(base / "config.json")
    loaded = load_base_with_overlay(base, out)
    assert loaded.cfg.supported_tasks == ("asr",) and loaded.card == card and loaded.cfg.max_utterance_s == 8.0
    whole = export_overlay(run, tmp_path / "whole.safetensors", max_utterance_s=None)
    assert load_base_with_overlay(base, tmp_path / "whole.safetensors").cfg.max_utterance_s is None
    assert whole["max_utterance_s"] is None
    assert "step 3" in describe_card(loaded.card) and "not measured" in describe_card(loaded.card)
    assert loaded.speech_llama_proj.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.speech_llama_proj.weight, t.model.speech_llama_proj.weight.detach(), atol=1e-3, rtol=1e-3)

    other = tmp_path / "other.safetensors"
    other.write_bytes(out.read_bytes()[:-2] + b"  ")  # other weights beside a copy of this card
    (tmp_path / "other.json").write_text(out.with_suffix(".json").read_text())
    assert own_card(other) is None

    # a tensor fp16 cannot hold is refused, not silently turned into inf
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"speech_llama_proj.weight": torch.full((2, 2), 1e6)}, str(bad / "best.safetensors"))
    with pytest.raises(CheckpointError, match="fp16"):
        export_overlay(bad, tmp_path / "bad.safetensors")


def test_a_run_starts_from_shipped_weights(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """init may name an exported overlay (what the repository ships): a new run on another
    machine, without the old run directory, goes on from exactly those weights."""
    from osum.train.export import export_overlay
    from osum.train.trainer import overlay_state_dict

    cfg, model = tiny_run
    joint = replace(cfg, stage="joint", steps=3, eval_every=3, lr_lora=1e-2)
    first = _trainer(tmp_path / "first", joint, model)
    first.train(say=lambda s: None)
    shipped = tmp_path / "ship" / "osum-mini.safetensors"
    export_overlay(tmp_path / "first", shipped)

    again = _trainer(tmp_path / "again", replace(joint, init=str(shipped)), model)
    assert again.step == 0
    # which file it started from, whatever is at that path later: the run keeps its sha256
    sha = json.loads((tmp_path / "again" / "init.json").read_text())["sha256"]
    assert sha == hashlib.sha256(shipped.read_bytes()).hexdigest()
    got, want = overlay_state_dict(again.model), overlay_state_dict(first.model)
    assert set(got) == set(want) and any("lora_B" in k for k in got)
    for k in want:  # the overlay is fp16: equal up to its rounding
        torch.testing.assert_close(got[k], want[k], atol=2e-3, rtol=1e-3)
    fresh = _trainer(tmp_path / "fresh", joint, model)
    assert not torch.allclose(overlay_state_dict(fresh.model)["speech_llama_proj.weight"], want["speech_llama_proj.weight"])
    again.train(say=lambda s: None)  # and it trains on from there
    assert (tmp_path / "again" / "last.pt").is_file()
    card = export_overlay(tmp_path / "again", tmp_path / "again.safetensors")
    assert card["source"]["init_sha256"] == sha  # the card says what it continued
    assert export_overlay(tmp_path / "first", tmp_path / "first.safetensors")["source"]["init_sha256"] is None

    ctc_only = tmp_path / "ctc.safetensors"  # weights without this run's LoRA are refused, not half-loaded
    from safetensors.torch import save_file

    save_file({k: v for k, v in want.items() if "lora" not in k}, str(ctc_only))
    with pytest.raises(ValueError, match="lacks"):
        _trainer(tmp_path / "bad", replace(joint, init=str(ctc_only)), model)


@pytest.mark.skipif(not Path("/usr/share/asterisk/sounds/en_US_f_Allison").is_dir(), reason="asterisk-core-sounds-en-wav")
def test_real_variants_keep_test_prompts_out_and_text_with_audio() -> None:
    """The items derived from real prompts (speeds, joined turns) use training prompts only,
    and a joined turn's text is its prompts' texts in the order its audio has them."""
    import numpy as np

    from osum.audio import trim_silence
    from osum.train.data import MAX_JOINED_S, _derived_audio, is_test, normalize, real_prompts, real_variants
    from osum.train.voices import read_wav

    prompts = real_prompts()
    test_texts = {normalize(p.text) for p in prompts if is_test(p)}
    by_path = {str(p.path): p for p in prompts}
    items = list(real_variants(seed=0, n_joined=40))
    assert len(items) == 2 * sum(1 for p in prompts if not is_test(p) and normalize(p.text)
                                 and normalize(p.text) not in test_texts) + 40  # fmt: skip
    for it in items:
        for src in it["sources"]:
            assert not is_test(by_path[src]) and normalize(by_path[src].text) not in test_texts
    speed = next(it for it in items if it["speed"] == 1.1)
    original = read_wav(speed["sources"][0])
    assert abs(_derived_audio(dict(speed)).size - original.size / 1.1) <= 2  # faster: fewer samples
    joins = [it for it in items if it["id"].startswith("real/join/")]
    lengths, cut = [], 0
    for original in joins:
        it = dict(original)
        audio = _derived_audio(it)
        kept = len(it["sources"])
        lengths.append(kept)
        assert it["sources"] == original["sources"][:kept] and kept >= 2  # a prefix, at least a pair
        assert it["text"] == " ".join(by_path[s].text for s in it["sources"])
        assert len(it["gaps"]) == kept - 1
        trimmed = [trim_silence(read_wav(s)).size for s in original["sources"]]
        parts = sum(trimmed[:kept]) + sum(int(g * 16000) for g in it["gaps"])
        assert abs(audio.size - parts / it["speed"]) <= 2
        assert kept == 2 or audio.size <= MAX_JOINED_S * 16000  # only a pair may run past the limit
        if kept < len(original["sources"]):  # cut: the next prompt would have taken it past the limit
            cut += 1
            longer = parts + int(original["gaps"][kept - 1] * 16000) + trimmed[kept]
            assert longer / it["speed"] > MAX_JOINED_S * 16000
        assert np.isfinite(audio).all()
    assert max(lengths) > 2 and cut > 0  # turns of several prompts, and some cut at the limit


@pytest.mark.skipif(not Path("/usr/share/asterisk/sounds/en_US_f_Allison").is_dir(), reason="asterisk-core-sounds-en-wav")
def test_edge_pad_adds_quiet_edges_to_the_same_turns() -> None:
    """``--edge-pad`` leaves the joined turns (prompts, gaps, speed, text) as they are and
    puts 0 to S seconds of a faint floor before and after each; the default adds nothing."""
    import numpy as np

    from osum.train.data import _derived_audio, real_variants

    plain = [it for it in real_variants(seed=0, n_joined=12) if it["id"].startswith("real/join/")]
    padded = [it for it in real_variants(seed=0, n_joined=12, edge_pad=0.3) if it["id"].startswith("real/join/")]
    assert all("edges" not in it for it in plain)
    assert [{k: v for k, v in it.items() if k != "edges"} for it in padded] == plain
    edges = [e for it in padded for e in it["edges"]]
    assert all(0 <= e <= 0.3 for e in edges) and len(set(edges)) > 4  # drawn, not fixed
    same_speed = [(p, q) for p, q in zip(plain, padded, strict=True) if p["speed"] == 1.0][:3]
    assert same_speed
    for p, q in same_speed:
        a, b = _derived_audio(dict(p)), _derived_audio(dict(q))
        lead, trail = (int(e * 16000) for e in q["edges"])
        assert b.size == a.size + lead + trail
        assert np.array_equal(b[lead : lead + a.size], a)  # the turn itself is untouched
        assert np.abs(np.concatenate([b[:lead], b[lead + a.size :]])).max(initial=0) < 1e-3  # silence
    with pytest.raises(ValueError):
        next(real_variants(seed=0, n_joined=1, edge_pad=-1))


@pytest.mark.skipif(not Path("/usr/share/asterisk/sounds/en_US_f_Allison").is_dir(), reason="asterisk-core-sounds-en-wav")
def test_evaluate_names_the_test_prompts_whose_sentence_is_recorded_twice() -> None:
    """The five held-out prompts whose sentence another Asterisk recording also says (the
    card's 2026-12-03 correction) are the ones `evaluate` leaves out of its unshared WER."""
    from osum.train.data import is_test, real_prompts
    from osum.train.evaluate import unshared

    prompts = real_prompts()
    tests = [p for p in prompts if is_test(p)]
    keep = set(unshared(tests, prompts))
    shared = sorted(tests[i].name for i in range(len(tests)) if i not in keep)
    assert len(keep) == len(tests) - 5
    assert shared == ["conf-waitforleader", "confbridge-begin-glorious-b", "confbridge-begin-glorious-c",
                      "confbridge-locked", "confbridge-only-one"]  # fmt: skip


@pytest.mark.skipif(not Path("/usr/share/asterisk/sounds/en_US_f_Allison").is_dir(), reason="asterisk-core-sounds-en-wav")
@pytest.mark.skipif(shutil.which("flite") is None, reason="flite (Makefile's APT_TEST)")
def test_evaluate_speaks_the_held_out_sentences_in_a_training_voice_the_same_way_every_run() -> None:
    """`evaluate --tts VOICE` reads the held-out sentences in a synthetic training voice: one
    clip per prompt with words (none for a silence file), the same samples run after run (so
    two weights are compared on the same audio), and another voice says them otherwise."""
    import numpy as np

    from osum.train.data import is_test, normalize, real_prompts
    from osum.train.evaluate import tts_clips

    tests = [p for p in real_prompts() if is_test(p)]
    silent = [p for p in tests if not normalize(p.text)]
    spoken = [p for p in tests if normalize(p.text)][:2]
    assert silent, "the held-out split has a silence file (its text has no words)"
    first, again = tts_clips(spoken + silent, "flite-slt"), tts_clips(spoken + silent, "flite-slt")
    assert [p.name for p, _ in first] == [p.name for p in spoken]
    for (_, a), (_, b) in zip(first, again, strict=True):
        assert a.dtype == np.float32 and a.size > 0.5 * 16000 and np.array_equal(a, b)
    other = tts_clips(spoken, "flite-rms")
    assert not any(a.size == b.size and np.allclose(a, b) for (_, a), (_, b) in zip(first, other, strict=True))


@pytest.mark.skipif(not Path("/usr/share/asterisk/sounds/en_US_f_Allison").is_dir(), reason="asterisk-core-sounds-en-wav")
def test_no_real_training_item_says_a_test_prompts_sentence() -> None:
    """Asterisk has several recordings of some sentences (conf-lockednow, confbridge-locked):
    one of them held out means none is trained on. Silence files (an empty normalised text)
    stay: they are the only silence in training."""
    from osum.train.data import _items, normalize

    items = [it for it in _items(seed=0, n_synth=0) if it["id"].startswith("real/")]
    test = {normalize(it["text"]) for it in items if it["split"] == "test"}
    train = [normalize(it["text"]) for it in items if it["split"] == "train"]
    assert len(test) > 50 and len(train) > 400
    assert [t for t in train if t and t in test] == []
    assert "" in train  # the silence files


def test_a_validation_split_is_held_out_like_the_test_split() -> None:
    """`build --validation`: ~1 in 6 real prompts of 3+ words become "validation", none a test prompt;
    no training item (real prompt, speed variant, joined turn, synthetic sentence) says a
    validation or test sentence; the test split is the same as without it."""
    from osum.train.data import _items, corpus, normalize, real_variants

    plain = [it for it in _items(seed=0, n_synth=0) if it["id"].startswith("real/")]
    items = [it for it in _items(seed=0, n_synth=0, validation=True) if it["id"].startswith("real/")]
    by_split = {k: [it for it in items if it["split"] == k] for k in ("train", "validation", "test")}
    assert [it["id"] for it in by_split["test"]] == [it["id"] for it in plain if it["split"] == "test"]
    assert 25 <= len(by_split["validation"]) <= 60
    # a silence file's or a tone's text normalises to "": no sentence, and silence files stay in training
    held = {normalize(it["text"]) for k in ("validation", "test") for it in by_split[k]} - {""}
    assert [it["id"] for it in by_split["train"] if normalize(it["text"]) in held] == []
    assert len(by_split["train"]) < sum(it["split"] == "train" for it in plain) - 20
    variants = list(real_variants(seed=0, n_joined=40, validation=True))
    assert [v["id"] for v in variants if any(normalize(t) in held for t in v["texts"])] == []
    texts = corpus(seed=0, n_templates=10, validation=True)
    assert [t for t in texts if normalize(t) in held] == []
    assert len(texts) < len(corpus(seed=0, n_templates=10))


def test_feature_mask_zeroes_whole_channels_in_training_only(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, model = tiny_run
    t = _trainer(tmp_path / "r", replace(cfg, time_mask=0.0, feature_mask=0.25), model)
    seen: list[torch.Tensor] = []
    t.model.down_sample_2.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    items = t.train_items[:3]
    t._speech(items, train=True)
    t._speech(items, train=False)
    D = seen[0].shape[2]
    for i, it in enumerate(items):
        n = t.feats[it["id"]].shape[0]
        dead = (seen[0][i, :n] == 0).all(0)  # channels zero in every frame of this item
        assert int(dead.sum()) == int(D * 0.25)
        assert int((seen[0][i, :n] == 0).sum()) == n * int(D * 0.25)  # and nothing else zeroed
        assert not (seen[1][i, :n] == 0).any()  # evaluation: unmasked
    masks = [(seen[0][i, : t.feats[it["id"]].shape[0]] == 0).all(0) for i, it in enumerate(items)]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # drawn per item
    with pytest.raises(ValueError, match="feature_mask"):
        replace(cfg, feature_mask=1.0)


def test_in_run_evaluation_reads_the_split_asked_for(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, model = tiny_run
    items = [json.loads(line) for line in (Path(cfg.data) / "manifest.0.jsonl").read_text().splitlines()]
    with pytest.raises(ValueError, match="--validation"):  # no such split in this data
        _trainer(tmp_path / "r0", replace(cfg, eval_split="validation"), model)
    items[0]["split"] = items[-1]["split"] = "validation"
    (Path(cfg.data) / "manifest.0.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    tr = _trainer(tmp_path / "r1", replace(cfg, eval_split="validation"), model)
    assert [it["id"] for it in tr.test_items] == [items[0]["id"], items[-1]["id"]]
    assert items[0]["id"] not in {it["id"] for it in tr.train_items}
    assert [it["id"] for it in _trainer(tmp_path / "r2", cfg, model).test_items] == [f"x{i}" for i in range(4, 7)]
    with pytest.raises(ValueError, match="eval_split"):
        replace(cfg, eval_split="dev")


def test_a_resumed_build_adds_no_duplicates_when_shards_shift(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Items already in any shard's manifest are not built again, even where a changed recipe
    (an item dropped) or another shard count moves them to another shard."""
    import numpy as np
    import soundfile as sf

    from osum.train import data

    wav = tmp_path / "a.wav"
    sf.write(str(wav), (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    items = [{"id": f"real/p{i}", "source": wav, "text": f"prompt {i}", "split": "train"} for i in range(6)]
    monkeypatch.setattr(data, "_items", lambda seed, n_synth, n_joined=0, edge_pad=0.0, validation=False, n_splices=0, aligned=None: (dict(it) for it in items))
    out = tmp_path / "data"
    for shard in (0, 1):
        data.build(out, 0, shard=shard, n_shards=2)
    assert sorted(it["id"] for it in data.load_manifest(out)) == sorted(it["id"] for it in items)
    items = items[1:] + [{"id": "real/p6", "source": wav, "text": "prompt 6", "split": "train"}]  # one dropped, one new
    data.build(out, 0, shard=0, n_shards=1)
    ids = [it["id"] for it in data.load_manifest(out)]
    assert len(ids) == len(set(ids)) == 7 and "real/p6" in ids


def test_layer_pools_are_each_layers_output_and_leave_no_hooks() -> None:
    import copy

    from osum.audio import log_mel
    from osum.encoder import WhisperEncoder
    from osum.train.gender_probe import layer_pools, pool

    torch.manual_seed(0)
    enc = WhisperEncoder(PRESETS["tiny"].encoder).eval()
    audio = torch.randn(16000) * 0.1
    with torch.inference_mode():
        rows = layer_pools(enc, audio)
        assert rows.shape == (len(enc.encoders), 2 * PRESETS["tiny"].encoder.d_model)
        assert all(not layer._forward_hooks for layer in enc.encoders)
        one = copy.deepcopy(enc)  # the first layer's output: an encoder cut after it, without the final norm
        one.encoders, one.after_norm = one.encoders[:1], torch.nn.Identity()
        assert torch.allclose(rows[0], pool(one(log_mel(audio)[None])[0][0]), atol=1e-5)
        assert not torch.allclose(rows[-1], pool(enc(log_mel(audio)[None])[0][0]), atol=1e-3)  # before the norm


def test_gender_probe_separates_a_direction_and_cv_holds_speakers_out() -> None:
    from osum.train.gender_probe import fit, pool, speaker_cv

    g = torch.Generator().manual_seed(0)
    # six speakers, 3 per class; the class lives in one direction, each speaker adds its own offset
    speakers, rows, labels = [], [], []
    for s in range(6):
        male = s % 2
        offset = torch.randn(8, generator=g) * 0.3
        for _ in range(10):
            x = torch.randn(8, generator=g) + offset
            x[0] += 3.0 if male else -3.0
            rows.append(x)
            labels.append(float(male))
            speakers.append(f"s{s}")
    x, y = torch.stack(rows), torch.tensor(labels)
    assert speaker_cv(x, y, speakers, 1e-3) > 0.9
    w, _ = fit(x, y, torch.ones(len(y)), 1e-3)
    assert int(w.abs().argmax()) == 0  # the label's direction, not a speaker's offset
    # shuffled labels carry no speaker-independent signal: held-out speakers score near chance
    perm = torch.tensor([float(i % 2) for i in range(6) for _ in range(10)])[torch.randperm(60, generator=g)]
    assert speaker_cv(x, perm, speakers, 1e-3) < 0.75
    h = torch.randn(50, 4, generator=g)
    assert torch.allclose(pool(h), torch.cat([h.mean(0), h.std(0)]))


def test_codec2_males_are_windows_of_the_listed_clips_and_never_a_held_out_speaker(tmp_path: Path) -> None:
    """The probe's extra real male voices: each listed clip cut into windows of at most 8 s
    (a tail under 2 s dropped), named by clip; the held-out morig / forig never join."""
    import numpy as np
    import soundfile as sf

    from osum.train.evaluate import gender_sets
    from osum.train.gender_probe import CODEC2_MALES, codec2_males

    rng = np.random.default_rng(0)
    for name, seconds in [("ve9qrp", 17.5), ("vk5qi", 9.0), ("morig", 2.0), ("forig", 2.0), ("m2400", 2.0)]:
        sf.write(tmp_path / f"{name}.wav", (rng.standard_normal(int(seconds * 8000)) * 0.1).astype(np.float32), 8000)
    got = codec2_males(root=tmp_path)
    assert [(s, len(a)) for s, a in got] == [("codec2-ve9qrp", 128000), ("codec2-ve9qrp", 128000),
                                             ("codec2-vk5qi", 128000)]  # fmt: skip
    assert {"morig", "forig", "m2400", "f2400"}.isdisjoint(CODEC2_MALES)
    assert not {f"codec2-{n}" for n in CODEC2_MALES} & set(gender_sets(1))


def test_pitch_variant_moves_the_pitch_of_real_speech_and_keeps_its_formants(male_clip) -> None:  # type: ignore[no-untyped-def]
    """The probe's pitch-moved copies: a real man's median F0 (about 110 Hz) moved to 180 Hz,
    same length, while his spectral envelope (frame by frame, the log-mel's cepstrum 1-12) stays
    close; the same measure finds it far off when the vocal tract is also made 20 % shorter."""
    import numpy as np
    import parselmouth

    from osum.audio import log_mel
    from osum.train.gender_probe import pitch_variant

    def median_f0(x: np.ndarray) -> float:
        f0 = parselmouth.Sound(x.astype(np.float64), sampling_frequency=16000).to_pitch(pitch_floor=60, pitch_ceiling=400)
        f = f0.selected_array["frequency"]
        return float(np.median(f[f > 0]))

    def cepstra(x: np.ndarray) -> torch.Tensor:
        m = log_mel(torch.as_tensor(x, dtype=torch.float32))  # (80, T)
        k = torch.arange(m.shape[0])
        dct = torch.cos(torch.pi / m.shape[0] * (k[None] + 0.5) * torch.arange(1, 13)[:, None])  # (12, 80)
        return dct @ m  # (12, T): the envelope's shape, not its level

    ref = cepstra(male_clip)
    level = log_mel(torch.as_tensor(male_clip)).mean(0)  # (T,)
    loud = level > level.max() - 1  # the speech frames, not the pauses

    def envelope_distance(x: np.ndarray) -> float:
        return float((cepstra(x) - ref)[:, loud].norm(dim=0).mean())

    moved = pitch_variant(torch.as_tensor(male_clip), 180.0).numpy()
    f0, f0_moved = median_f0(male_clip), median_f0(moved)
    assert 90 < f0 < 135 and abs(f0_moved - 180) < 8 and moved.shape == male_clip.shape, (f0, f0_moved)
    snd = parselmouth.Sound(male_clip.astype(np.float64), sampling_frequency=16000)
    shorter = parselmouth.praat.call(snd, "Change gender", 60.0, 400.0, 1.2, 180.0, 1.0, 1.0).values[0]
    kept, moved_too = envelope_distance(moved), envelope_distance(shorter)  # measured 1.7 and 6.5
    assert kept < 2.5 and moved_too > 4.5, (kept, moved_too)


def test_the_served_figure_is_logged_with_the_card_when_measured() -> None:
    """The server's start line gives the WER as served (evaluate --card --served) beside the whole reading."""
    from osum.loading import describe_card

    measured = {"wer": 0.163, "whisper_base_wer": 0.04, "prompts": 100, "gender_macro": 0.52, "date": "2026-12-06"}
    card = {"source": {"run": "r", "step": 3}, "supported_tasks": ["asr"], "measured": measured}
    assert "as served" not in describe_card(card) and "16.3%" in describe_card(card)
    card["measured"] = measured | {"served": {"wer": 0.149}}
    assert "held-out WER 16.3%, 14.9% as served" in describe_card(card)


def test_evaluate_names_the_software_and_cpu_its_figures_depend_on() -> None:
    """The held-out figures are exact on one machine but move across machines (docs/osum-mini.md),
    so `evaluate` prints, and `--card` records, the versions and the CPU they were measured with."""
    from importlib.metadata import version

    from osum.train.evaluate import environment

    env = environment()
    assert env["torch"] == version("torch") and env["transformers"] == version("transformers")
    assert env["silero-vad"] == version("silero-vad")  # the served figures' endpointer
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    json.dumps(env)  # it goes into the card as it is


def test_a_feature_cache_serves_only_the_data_it_was_computed_from(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Augmented splices keep their raw twins' ids: a cache of one data set must not feed another."""
    import json

    import numpy as np
    import soundfile as sf

    from osum.encoder import WhisperEncoder
    from osum.train import features

    data, other, out = tmp_path / "data", tmp_path / "other", tmp_path / "feats"
    for d in (data, other):
        d.mkdir()
        sf.write(str(d / "a.flac"), (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000, format="FLAC")
        (d / "manifest.0.jsonl").write_text(json.dumps({"id": "x/a", "audio": "a.flac", "split": "train"}) + "\n")
    torch.manual_seed(0)
    monkeypatch.setattr(features, "load_encoder", lambda base: WhisperEncoder(PRESETS["tiny"].encoder).eval())
    assert features.cache_features(data, out, tmp_path, say=lambda s: None) == 1
    assert set(features.load_features(out, data)) == {"x/a"} == features.cached_ids(out)
    with pytest.raises(ValueError, match="its own cache directory"):
        features.load_features(out, other)
    with pytest.raises(ValueError, match="its own cache directory"):
        features.cache_features(other, out, tmp_path, say=lambda s: None)
    (out / features.SOURCE).unlink()  # a cache from before source.json: taken as is
    assert set(features.load_features(out, other)) == {"x/a"}
    assert features.cache_features(other, out, tmp_path, say=lambda s: None) == 0
    assert not (out / features.SOURCE).exists()  # and not claimed for the data that happened to extend it


def test_run_config_paths_resolve_as_the_command_line_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, run = tmp_path / "cache", tmp_path / "cache" / "train" / "runs" / "r2"
    cfg = RunConfig(stage="joint").resolved(run, root)
    assert (cfg.data, cfg.feats, cfg.base) == (str(root / "train" / "data"), str(root / "train" / "feats"), str(root / "osum-mini"))
    assert cfg.init is None
    cfg = RunConfig(data="data-splice", feats="/abs/feats", init="r1").resolved(run, root)
    assert (cfg.data, cfg.feats, cfg.init) == (str(root / "train" / "data-splice"), "/abs/feats", str(run.parent / "r1"))
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(init="osum/weights/osum-mini.safetensors").resolved(run, root)
    assert cfg.init == str(tmp_path / "osum" / "weights" / "osum-mini.safetensors")  # from where the command runs
    assert RunConfig(init="/abs/r0").resolved(run, root).init == "/abs/r0"


def test_the_trainer_reads_cached_features_from_mapped_shards(tmp_path: Path) -> None:
    """The feature cache is mapped, not copied: a training process holds a few GB less of its own."""
    from osum.train import features

    out = tmp_path / "feats"
    out.mkdir()
    shard = {f"x/{i}": torch.randn(50 + i, 8).half() for i in range(3)}
    torch.save(shard, out / "feats.0.pt")
    mapped, copied = features.load_features(out), features.load_features(out, mmap=False)
    assert set(mapped) == set(copied) == set(shard)
    for k, v in shard.items():
        assert torch.equal(mapped[k], v) and torch.equal(copied[k], v)
    maps = Path("/proc/self/maps").read_text()
    assert str(out / "feats.0.pt") in maps  # the shard is mapped into this process
    del mapped, copied
