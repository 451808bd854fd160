"""One training run's settings (:class:`RunConfig`), saved as ``config.json`` in its run directory.

The committed configs in ``osum/train/runs/`` are the record of every run on the model card
(docs/osum-mini.md): which data, which start, which steps and rates, fixed before the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    """One training run; saved as ``config.json`` in the run directory."""

    stage: str = "ctc"  # ctc | joint
    data: str = ""  # data directory (manifest + audio); relative: under <cache>/train (CLI)
    feats: str = ""  # cached encoder outputs
    base: str = ""  # prepared osum-mini directory
    # what initialises this run: a run directory (its last.pt), or shipped weights (an exported
    # overlay, e.g. osum/weights/osum-mini.safetensors: adapter, boundary embeddings, LoRA; the
    # CTC head's blank and scale start anew), so that training goes on on a machine without the run
    init: str | None = None
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3  # adapter and heads
    lr_lora: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ctc_weight: float = 1.0  # joint stage: weight of the auxiliary CTC loss
    tasks: dict[str, float] = field(default_factory=lambda: {"asr": 0.6, "sgc": 0.4})  # joint stage task mix
    time_mask: float = 0.1  # fraction of encoder frames zeroed per item (SpecAugment-like)
    # fraction of the encoder's output channels zeroed per item, the same channels in every
    # frame (SpecAugment's frequency masks, on the encoder's features): the real prompts are
    # memorised (training loss ~0.05) while held-out prompts of the same voice are not read
    feature_mask: float = 0.0
    ctc_min_count: int = 1  # CTC vocabulary: token types seen at least this often in the training texts
    # joint stage started from a ctc run: rescale the projection so speech embeddings have the
    # norm of Qwen's token embeddings. The CTC head is cosine-based, so the ctc stage leaves the
    # norm free (~75 vs ~0.5 for text), and frames 150x louder than text derail the frozen LLM.
    match_embedding_norm: bool = True
    # sampling weight of a real recording against a synthetic one (1: uniform over items). Real
    # speech is 454 of 12,550 training items; weighting it up shows the model more real voices
    real_weight: float = 1.0
    # decay of an exponential moving average of the trained weights (0: none). Held-out WER swings
    # by several points from one evaluation to the next; evaluating and shipping the average
    # (as wenet's checkpoint averaging does, but without keeping checkpoints) smooths that out
    ema: float = 0.0
    eval_every: int = 250
    eval_items: int = 101  # held-out real prompts to decode at each evaluation
    # which of them: "test" (the prompts the card reports) or "validation" (data built with
    # ``--validation``: choosing steps and settings on it leaves the test prompts unread)
    eval_split: str = "test"
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.stage not in ("ctc", "joint"):
            raise ValueError(f"stage must be ctc or joint, got {self.stage!r}")
        if not self.real_weight > 0:
            raise ValueError(f"real_weight must be > 0, got {self.real_weight}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not (0.0 <= self.time_mask < 1.0 and 0.0 <= self.feature_mask < 1.0):
            raise ValueError(f"time_mask and feature_mask must be in [0, 1), got {self.time_mask}, {self.feature_mask}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split must be test or validation, got {self.eval_split!r}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls(**json.loads(path.read_text()))

    def resolved(self, run: Path, root: Path) -> RunConfig:
        """Paths made absolute as ``python -m osum.train.trainer RUN`` reads them: empty ``data``,
        ``feats`` and ``base`` are the defaults under ``root`` (the cache), relative ``data`` and
        ``feats`` name siblings of the defaults (a variant data set), a ``.safetensors`` ``init``
        (shipped weights) is a path from here or ``~``, and any other relative ``init`` is a run
        beside ``run``."""
        defaults = {"data": str(root / "train" / "data"), "feats": str(root / "train" / "feats"), "base": str(root / "osum-mini")}
        cfg = dataclasses.replace(self, **{k: v for k, v in defaults.items() if not getattr(self, k)})
        cfg = dataclasses.replace(cfg, **{k: str(root / "train" / getattr(cfg, k)) for k in ("data", "feats")
                                          if not Path(getattr(cfg, k)).is_absolute()})  # fmt: skip
        if cfg.init and cfg.init.endswith(".safetensors"):
            cfg = dataclasses.replace(cfg, init=str(Path(cfg.init).expanduser().resolve()))
        elif cfg.init and not Path(cfg.init).is_absolute():
            cfg = dataclasses.replace(cfg, init=str(run.parent / cfg.init))
        return cfg
