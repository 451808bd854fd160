"""Ship a training run's weights: the overlay in fp16 and the model card beside it.

    python -m osum.train.export RUN_DIR [--weights best|latest|last] [--out osum/weights/osum-mini.safetensors]
    python -m osum.train.evaluate --overlay osum/weights/osum-mini.safetensors --quantize int8 --card

The overlay is what osum-mini loads on top of its prepared base (adapter, projection,
boundary embeddings, LoRA; ~11.6 M parameters). fp16 halves it (23 MB instead of 46 MB)
and costs nothing measurable: every tensor is cast back to fp32 when loaded and the LoRA
product is merged in fp32 (the largest relative rounding error is ~5e-4; the export
refuses a tensor outside fp16's range).

The card (``<out>.json``) records where the weights came from and, once ``evaluate --card``
has run on the exported file itself, what they measured. ``supported_tasks`` is what the
serving path offers: transcription, plus a tag task only when its measured accuracy on
held-out real speakers met its target (gender: 95 %). Nothing unmeasured is ever claimed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..loading import MINI_OVERLAY, read_card
from ..prepare import file_sha256

__all__ = ["MAX_UTTERANCE_S", "export_overlay", "own_card", "write_card", "main"]

# the longest utterance the engine gives osum-mini's weights at once: whole turns past 8 s were
# measured much worse than the same turns split (load_tests/long_turns.py, docs/osum-mini.md)
MAX_UTTERANCE_S = 8.0


def own_card(overlay: Path) -> dict | None:
    """``overlay``'s card if it was written for this very file (its sha256), else None."""
    card = read_card(overlay)
    return card if card is not None and card.get("sha256") == file_sha256(overlay) else None


def write_card(overlay: Path, card: dict) -> None:
    path = overlay.with_suffix(".json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(path)


def export_overlay(run: Path, out: Path, weights: str = "best", max_utterance_s: float | None = MAX_UTTERANCE_S) -> dict:
    """Write ``run``'s ``best.safetensors`` (or ``latest.safetensors``, or ``last.pt``'s live
    trained parts) to ``out`` in fp16, with a card saying where it came from; returns the card.
    Transcription only until measured.

    ``best`` was chosen by WER on the held-out prompts the card then reports (optimistic);
    ``latest`` is the last evaluated step (the moving average where the run keeps one), which
    no test figure chose. ``max_utterance_s`` goes on the card (None: Whisper's 30 s window), so
    that the engine and ``evaluate --served`` split the export's turns as they split the shipped
    weights'."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta: dict[str, str] = {}
    if weights in ("best", "latest"):
        src = run / f"{weights}.safetensors"
        if not src.is_file():
            raise CheckpointError(f"{src}: no {weights} weights (the run has not evaluated yet)")
        with safe_open(str(src), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            meta = f.metadata() or {}
    elif weights == "last":
        src = run / "last.pt"
        state = torch.load(src, map_location="cpu", weights_only=False)
        sd = {k: v for k, v in state["weights"].items() if not k.startswith("ctc.")}  # the CTC head is training-only
        meta = {"step": str(state["step"])}
    else:
        raise ValueError(f"weights: best, latest or last, not {weights!r}")
    half = {}
    for k, v in sd.items():
        v = v.float()
        if not torch.isfinite(v).all() or v.abs().max() > torch.finfo(torch.float16).max:
            raise CheckpointError(f"{src}: {k} is not finite or outside fp16's range; not exported")
        half[k] = v.half().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(out), metadata={k: str(v) for k, v in meta.items()})
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    init = json.loads((run / "init.json").read_text()) if (run / "init.json").is_file() else None
    card = {
        "name": "osum-mini",
        "supported_tasks": ["asr"],
        "max_utterance_s": max_utterance_s,
        "source": {
            "run": run.name,
            "weights": weights,
            "wer_at_export": float(meta["wer"]) if "wer" in meta else None,
            "step": int(meta["step"]) if "step" in meta else None,
            "run_config": config,
            # the shipped weights the run started from (its init path names whatever ships later)
            "init_sha256": init["sha256"] if init else None,
            "exported": dt.date.today().isoformat(),
        },
        "sha256": file_sha256(out),
        "measured": None,
    }
    write_card(out, card)
    return card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a training run directory")
    ap.add_argument("--weights", choices=("best", "latest", "last"), default="best",
                    help="best: chosen on the held-out prompts; latest: the last evaluated step; last: live weights of last.pt")
    ap.add_argument("--step", type=int, help="the step of best.safetensors, when the run did not record it")
    ap.add_argument("--out", type=Path, default=MINI_OVERLAY)
    ap.add_argument("--max-utterance-s", type=float, default=MAX_UTTERANCE_S, metavar="S",
                    help=f"the card's longest utterance read at once (default {MAX_UTTERANCE_S:g}; 0: Whisper's 30 s window)")
    args = ap.parse_args()
    card = export_overlay(args.run, args.out, args.weights, args.max_utterance_s or None)
    if args.step is not None:
        card["source"]["step"] = args.step
        write_card(args.out, card)
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, step {card['source']['step']}) and its card; "
          f"now measure it: python -m osum.train.evaluate --overlay {args.out} --quantize int8 --card")  # fmt: skip


if __name__ == "__main__":
    main()
