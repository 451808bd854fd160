"""Train osum-mini: adapter (+ boundary embeddings + LoRA) on cached encoder outputs.

Two stages, one loop (``python -m osum.train.trainer RUN_DIR [--config FILE]``):

* ``ctc``: the adapter alone learns to put its 12.5 Hz outputs into the LLM's embedding
  space: CTC over Qwen token ids with logits ``s * cos(h, E[v])`` against the frozen
  input-embedding rows of the vocabulary seen in the training texts, plus a learned blank
  (:mod:`osum.train.objectives`, as the joint stage's loss).
  About 1 s a step on 2 cores; no LLM forward. A plain end-to-end start never moved off
  the text prior in an hour (see the training probe notes); this finds the alignment first.
* ``joint``: OSUM's recipe on top: ``[prompt, begin, speech, end, target]`` through the
  frozen Qwen (bf16) with LoRA; loss on the target tokens (ASR+X: transcript, then the
  tag for SGC items), plus the CTC loss as an auxiliary. Logits only at target positions.

A run directory holds ``config.json`` (the :class:`~osum.train.config.RunConfig`), ``log.jsonl``,
``loss.png``, ``last.pt`` (everything needed to resume: trainable weights, optimiser,
step, RNG), ``latest.safetensors`` (the overlay last evaluated) and ``best.safetensors``
(the one with the best held-out WER so far); a run started from shipped weights also holds
``init.json`` (that file's path and sha256, which the export's card carries). The evaluation
prompts are the held-out test prompts (the only real English speech not trained on), so
"best" is chosen on the test set and its figure is optimistic; "latest" (a step fixed in
advance) is not chosen on it. Runs on CPU; uses CUDA when available, with identical code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import subsampled_length
from ..config import PRESETS, OsumConfig
from ..model import OsumModel
from ..tasks import get_task
from .config import RunConfig
from .lora import add_lora, lora_parameters, lora_state_dict
from .objectives import CTCHead, asr_x_example, ctc_loss, llm_loss

__all__ = ["Trainer", "load_base_llm", "overlay_state_dict"]


def load_base_llm(base: Path, dtype: torch.dtype) -> nn.Module:
    """The frozen Qwen2.5-0.5B from a prepared osum-mini directory."""
    from safetensors import safe_open

    from ..loading import params_on_meta
    from ..model import build_llm

    cfg = OsumConfig.load(base / "config.json")
    with params_on_meta():
        llm = build_llm(cfg)
    with safe_open(str(base / "base.safetensors"), "pt") as f:
        sd = {k[4:]: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith("llm.")}  # noqa: SIM118
    llm.load_state_dict(sd, strict=True, assign=True)
    return llm.requires_grad_(False).eval()


def overlay_state_dict(model: OsumModel) -> dict[str, torch.Tensor]:
    """What osum-mini ships in the repository: the trained parts only, LoRA under peft names."""
    keep = ("down_sample_2.", "speech_transformer.", "speech_llama_proj.", "speech_token_emded.")
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items() if k.startswith(keep) and ".pos_enc." not in k}
    return sd | lora_state_dict(model.llm)


class Trainer:
    def __init__(self, run: Path, cfg: RunConfig, osum_cfg: OsumConfig | None = None, llm: nn.Module | None = None) -> None:
        from .data import load_manifest
        from .features import load_features

        self.run, self.cfg = run, cfg
        run.mkdir(parents=True, exist_ok=True)
        cfg.save(run / "config.json")
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.rng = random.Random(cfg.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 on CUDA; fp32 on CPU, where bf16 matmuls without AVX512-BF16/AMX run ~100x slower
        llm_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        ocfg = osum_cfg or PRESETS["osum-mini"]
        self.model = OsumModel(ocfg, llm=llm if llm is not None else load_base_llm(Path(cfg.base), llm_dtype))
        self.model.encoder.requires_grad_(False)  # frozen; its outputs are cached
        self.model.to(self.device)
        self.model.llm.to(llm_dtype)
        self.llm_dtype = llm_dtype
        self.tok = self._tokenizer()
        items = load_manifest(Path(cfg.data))
        self.feats = load_features(Path(cfg.feats), Path(cfg.data))
        self.train_items = [it for it in items if it["split"] == "train" and it["id"] in self.feats]
        evals = [it for it in items if it["split"] == cfg.eval_split and it["id"] in self.feats]
        self.test_items = evals[: cfg.eval_items]
        if cfg.eval_split == "validation" and not self.test_items:
            raise ValueError(f"no {cfg.eval_split!r} items with features in {cfg.data} "
                             f"(a validation split needs data built with --validation)")  # fmt: skip
        counts = Counter(t for it in self.train_items for t in self.tok.encode(it["text"], add_special_tokens=False))
        vocab = sorted(t for t, c in counts.items() if c >= cfg.ctc_min_count)
        self.ctc = CTCHead(self.model.llm.get_input_embeddings().weight.detach(), vocab).to(self.device)
        if cfg.stage == "joint":
            add_lora(self.model.llm, ocfg.lora_targets, ocfg.lora_rank, ocfg.lora_alpha, dropout=0.05)
            self.model.llm.to(self.device)
        groups = [{"params": self._adapter_params() + list(self.ctc.parameters()), "lr": cfg.lr}]
        if cfg.stage == "joint":
            groups.append({"params": lora_parameters(self.model.llm), "lr": cfg.lr_lora})
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self._trained = [p for g in groups for p in g["params"]]
        self.ema: list[torch.Tensor] | None = None  # set below, once the starting weights are in
        self.step = 0
        self.stop_requested = False  # set from a signal handler: stop after the current step
        self.best_wer = float("inf")
        if (run / "last.pt").is_file():
            self._restore(run / "last.pt", full=True)
        elif cfg.init and cfg.init.endswith(".safetensors"):
            from safetensors.torch import load_file

            from ..prepare import file_sha256

            # the init path names whatever ships at the time (osum/weights/...): keep which file it was
            digest = file_sha256(Path(cfg.init))
            (run / "init.json").write_text(json.dumps({"init": cfg.init, "sha256": digest}) + "\n")
            shipped = {k: v.float() for k, v in load_file(cfg.init, device=str(self.device)).items()}
            missing = set(overlay_state_dict(self.model)) - set(shipped)
            if missing:  # e.g. a joint run from an overlay without LoRA, or another model's file
                raise ValueError(f"{cfg.init} lacks {len(missing)} of this run's trainable tensors, e.g. {sorted(missing)[0]}")
            self._load_weights(shipped)
        elif cfg.init:
            self._restore(Path(cfg.init) / "last.pt", full=False)
            if cfg.stage == "joint" and cfg.match_embedding_norm:
                self._match_embedding_norm()
        if cfg.ema and self.ema is None:
            self.ema = [p.detach().clone() for p in self._trained]

    # ---- parameters and checkpoints -------------------------------------------------

    def _tokenizer(self) -> Any:
        from ..loading import bundled_tokenizer_dir, load_tokenizer

        base = Path(self.cfg.base)
        return load_tokenizer(base if (base / "tokenizer.json").is_file() else bundled_tokenizer_dir())

    def _adapter_params(self) -> list[nn.Parameter]:
        m = self.model
        mods = (m.down_sample_2, m.speech_transformer, m.speech_llama_proj, m.speech_token_emded)
        return [p for mod in mods for p in mod.parameters()]

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return overlay_state_dict(self.model) | {f"ctc.{k}": v for k, v in self.ctc.state_dict().items()}

    def _save(self) -> None:
        state = {
            "weights": self._trainable_state(), "opt": self.opt.state_dict(), "step": self.step,
            "best_wer": self.best_wer, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
            "ema": self.ema,
        }  # fmt: skip
        tmp = self.run / "last.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.run / "last.pt")

    def _save_overlay(self, name: str, wer: float) -> None:
        """The overlay as the model holds it now (the average, inside :meth:`_averaged`)."""
        from safetensors.torch import save_file

        tmp = self.run / f"{name}.tmp"
        save_file({k: v.contiguous() for k, v in overlay_state_dict(self.model).items()}, str(tmp),
                  metadata={"step": str(self.step), "wer": f"{wer:.4f}", "ema": str(self.cfg.ema)})  # fmt: skip
        tmp.replace(self.run / name)

    def _restore(self, path: Path, full: bool) -> None:
        state = torch.load(path, weights_only=False, map_location=self.device)
        self._load_weights(state["weights"])
        if full:
            self.opt.load_state_dict(state["opt"])
            self.step, self.best_wer = state["step"], state["best_wer"]
            self.rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            if self.cfg.ema and state.get("ema") is not None:
                self.ema = [e.to(self.device) for e in state["ema"]]

    def _load_weights(self, w: dict[str, torch.Tensor]) -> None:
        """Trainable weights by name (a checkpoint's or an overlay's); what is absent keeps its
        value (a joint run from a CTC run: LoRA starts at zero)."""
        self.model.load_state_dict({k: v for k, v in w.items() if not k.startswith(("ctc.", "llm."))}, strict=False)
        lora = {k: v for k, v in w.items() if k.startswith("llm.")}
        if lora:
            own = {f"llm.{n}": p for n, p in self.model.llm.named_parameters()}
            for k, v in lora.items():  # peft names -> our wrapper's names
                name = k.replace(".default.weight", ".weight")
                if name in own:
                    own[name].data.copy_(v)
        ctc = {k[4:]: v for k, v in w.items() if k.startswith("ctc.")}
        if ctc and ctc["vocab"].shape == self.ctc.vocab.shape:
            self.ctc.load_state_dict(ctc)

    @torch.no_grad()
    def _match_embedding_norm(self) -> None:
        """Scale ``speech_llama_proj`` so its outputs' mean norm equals the token embeddings'."""
        target = self.model.llm.get_input_embeddings().weight.float().norm(dim=-1).mean()
        items = self.rng.sample(self.train_items, min(64, len(self.train_items)))
        speech, lengths = self._speech(items, train=False)
        valid = torch.arange(speech.shape[1], device=self.device)[None] < lengths[:, None]
        current = speech[valid].float().norm(dim=-1).mean()
        proj = self.model.speech_llama_proj
        proj.weight.mul_(target / current)
        proj.bias.mul_(target / current)

    # ---- batches ----------------------------------------------------------------------

    def _speech(self, items: list[dict], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached encoder outputs -> adapter -> LLM-width speech embeddings (B, L, d) and lengths."""
        xs = [self.feats[it["id"]].float() for it in items]
        T = max(x.shape[0] for x in xs)
        x = torch.zeros(len(xs), T, xs[0].shape[1])
        for i, f in enumerate(xs):
            x[i, : f.shape[0]] = f
            if train and self.cfg.time_mask > 0:  # zero a few short spans of frames
                n = int(f.shape[0] * self.cfg.time_mask)
                for _ in range(max(1, n // 10)):
                    s = self.rng.randrange(max(1, f.shape[0] - 10))
                    x[i, s : s + 10] = 0
            if train and self.cfg.feature_mask > 0:
                x[i, :, self.rng.sample(range(x.shape[2]), int(x.shape[2] * self.cfg.feature_mask))] = 0
        x = x.to(self.device)
        lengths = torch.tensor([f.shape[0] for f in xs], device=self.device)
        m = self.model
        h = m.down_sample_2(x)
        lengths = subsampled_length(lengths)
        h = m.speech_transformer(h, lengths)
        return m.speech_llama_proj(h), lengths

    def _ctc_loss(self, speech: torch.Tensor, lengths: torch.Tensor, items: list[dict]) -> torch.Tensor:
        return ctc_loss(self.ctc, speech, lengths, [self.tok.encode(it["text"], add_special_tokens=False) for it in items])

    def _targets(self, item: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) for a task drawn for ``item`` (:func:`asr_x_example`)."""
        return asr_x_example(self.tok, item, self.cfg.tasks, self.cfg.real_weight, self.rng, self.model.cfg.eos_token_id)

    def _llm_loss(self, speech: torch.Tensor, lengths: torch.Tensor, items: list[dict]) -> torch.Tensor:
        return llm_loss(self.model, speech, lengths, [self._targets(it) for it in items])

    # ---- loop -------------------------------------------------------------------------

    def _lr_factor(self) -> float:
        if self.step < self.cfg.warmup:
            return (self.step + 1) / self.cfg.warmup
        progress = (self.step - self.cfg.warmup) / max(1, self.cfg.steps - self.cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _batch(self) -> list[dict]:
        # length-grouped: pick a random item, take neighbours in duration order. With real_weight,
        # first a pool (real or synthetic recordings) in proportion to its weighted size
        if not hasattr(self, "_pools"):
            def by_len(items: list[dict]) -> list[dict]:
                return sorted(items, key=lambda it: it["seconds"])

            real = [it for it in self.train_items if it["id"].startswith("real/")]
            synthetic = [it for it in self.train_items if not it["id"].startswith("real/")]
            if self.cfg.real_weight == 1.0 or not real or not synthetic:
                self._pools, self._pool_weights = [by_len(self.train_items)], [1.0]
            else:
                self._pools = [by_len(synthetic), by_len(real)]
                self._pool_weights = [float(len(synthetic)), self.cfg.real_weight * len(real)]
        pool = self._pools[0] if len(self._pools) == 1 else self.rng.choices(self._pools, self._pool_weights)[0]
        i = self.rng.randrange(len(pool))
        lo = max(0, min(i, len(pool) - self.cfg.batch_size))
        return pool[lo : lo + self.cfg.batch_size]

    def train(self, say=print) -> None:  # type: ignore[no-untyped-def]
        with (self.run / "log.jsonl").open("a") as log:
            self._loop(log, say)

    def _loop(self, log, say) -> None:  # type: ignore[no-untyped-def]
        self.model.train()
        self.model.encoder.eval()
        self.model.llm.eval()  # frozen base: no dropout (LoRA's own dropout is active in train())
        t0 = time.perf_counter()
        while self.step < self.cfg.steps:
            for g, base_lr in zip(self.opt.param_groups, (self.cfg.lr, self.cfg.lr_lora)):
                g["lr"] = base_lr * self._lr_factor()
            items = self._batch()
            speech, lengths = self._speech(items, train=True)
            rec: dict[str, Any] = {}
            if self.cfg.stage == "ctc" or self.cfg.ctc_weight:  # a joint run without CTC skips its head
                ctc = self._ctc_loss(speech, lengths, items)
                loss, rec["ctc"] = ctc, ctc.item()
            if self.cfg.stage == "joint":
                llm = self._llm_loss(speech, lengths, items)
                loss = llm + self.cfg.ctc_weight * ctc if "ctc" in rec else llm
                rec["llm"] = llm.item()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 5.0)
            self.opt.step()
            if self.ema is not None:
                torch._foreach_lerp_(self.ema, [p.detach() for p in self._trained], 1.0 - self.cfg.ema)
            self.step += 1
            rec |= {"step": self.step, "loss": loss.item(), "lr": self.opt.param_groups[0]["lr"], "sec": round(time.perf_counter() - t0, 1)}
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                with self._averaged():  # the moving average, where the run keeps one
                    rec |= self.evaluate()
                    self._save_overlay("latest.safetensors", rec["wer"])
                    if rec["wer"] < self.best_wer:
                        self.best_wer = rec["wer"]
                        self._save_overlay("best.safetensors", rec["wer"])
                self._save()
                self.model.train()
                self.model.encoder.eval()
                self.model.llm.eval()
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if "wer" in rec:
                self.plot()  # after the record is in the log, so the WER panel has it
            if self.step % 10 == 0 or "wer" in rec:
                say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            if self.stop_requested:  # SIGTERM / SIGINT: keep this step's work, resume later
                self._save()
                say(f"stopped at step {self.step}; saved {self.run / 'last.pt'}; run the same command to resume")
                return

    @contextlib.contextmanager
    def _averaged(self) -> Iterator[None]:
        """Within the block the trained parameters hold their moving average (if the run keeps
        one); the live weights come back after it."""
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self._trained]
        with torch.no_grad():
            for p, e in zip(self._trained, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self._trained, live):
                    p.copy_(w)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """WER on held-out real speech: greedy CTC (ctc stage) or LLM greedy decoding (joint)."""
        from .metrics import capped_wer, wer

        self.model.eval()
        refs, hyps = [], []
        for i in range(0, len(self.test_items), 16):
            items = self.test_items[i : i + 16]
            speech, lengths = self._speech(items, train=False)
            if self.cfg.stage == "ctc":
                logp = self.ctc(speech)
                texts = [self.tok.decode(self.ctc.greedy(logp[b], int(lengths[b]))) for b in range(len(items))]
            else:
                texts = self._decode(speech, lengths)
            refs += [it["text"] for it in items]
            hyps += texts
        return {"wer": wer(refs, hyps), "wer_capped": capped_wer(refs, hyps)}

    def _decode(self, speech: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        from ..decoding import DecodingOptions, generate

        prompt = self.tok.encode(get_task("asr").prompt, add_special_tokens=False)
        inp = self.model.splice([prompt] * speech.shape[0], speech, lengths)
        hyps = generate(self.model.llm, inp, DecodingOptions(max_new_tokens=60), self.model.cfg.eos_token_id)
        return [self.tok.decode(h.tokens) for h in hyps]

    def plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        recs = [json.loads(line) for line in (self.run / "log.jsonl").read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for key in ("ctc", "llm"):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax[0].plot(*zip(*pts), label=key, alpha=0.7)
        ax[0].set_xlabel("step")
        ax[0].set_ylabel("loss (nats/token)")
        ax[0].legend()
        pts = [(r["step"], r["wer"]) for r in recs if "wer" in r]
        if pts:
            ax[1].plot(*zip(*pts), marker="o")
        ax[1].set_xlabel("step")
        ax[1].set_ylabel("held-out real WER")
        fig.tight_layout()
        fig.savefig(self.run / "loss.png")
        plt.close(fig)


def main() -> None:
    from ..loading import cache_dir

    ap = argparse.ArgumentParser(description="train osum-mini (resumes if RUN_DIR/last.pt exists)")
    ap.add_argument("run", type=Path)
    ap.add_argument("--config", type=Path, help="a RunConfig JSON; default: RUN_DIR/config.json or the defaults")
    ap.add_argument("--reset-best", action="store_true",
                    help="forget the best held-out WER so far (after changing eval_items: the old figure is on other prompts)")
    args = ap.parse_args()
    src = args.config or (args.run / "config.json")
    cfg = (RunConfig.load(src) if src.is_file() else RunConfig()).resolved(args.run, cache_dir())
    trainer = Trainer(args.run, cfg)
    if args.reset_best:
        trainer.best_wer = float("inf")

    def stop(signum: int, frame: object) -> None:
        trainer.stop_requested = True  # finish the current step, save, exit

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    trainer.train()


if __name__ == "__main__":
    main()
