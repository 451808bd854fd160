"""Cache the frozen Whisper encoder's outputs for every training item.

osum-mini keeps Whisper-base frozen (as it is converted: exact), so its 50 Hz outputs
are computed once per item, in full-context mode (what offline recognition and
streaming finals use), and stored in fp16 shards: ``feats.N.pt`` holding
``{id: (T, 512) fp16 tensor}``. Re-running skips items already cached.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..audio import load_audio, log_mel
from ..config import PRESETS
from ..encoder import WhisperEncoder
from .data import load_manifest

__all__ = ["load_encoder", "check_source", "cache_features", "cached_ids", "load_features"]

# which data directory a cache's outputs were computed from: the cache is keyed by item id, and
# ids repeat across data sets whose audio differs (data-augsplice's augmented splices carry
# data-splice's ids), so one cache must never serve two data sets
SOURCE = "source.json"


def check_source(feats: Path, data: Path) -> None:
    """Raises ValueError where the cache ``feats`` records another data directory than ``data``."""
    f = feats / SOURCE
    if f.is_file() and (was := json.loads(f.read_text())["data"]) != str(data.resolve()):
        raise ValueError(f"{feats} holds the encoder outputs of {was}, not of {data}: "
                         f"give each data set its own cache directory (features --out, a run's \"feats\")")  # fmt: skip


def load_encoder(base_dir: Path) -> WhisperEncoder:
    """osum-mini's frozen Whisper-base encoder from ``<cache>/osum-mini/base.safetensors``."""
    from safetensors import safe_open

    enc = WhisperEncoder(PRESETS["osum-mini"].encoder).eval()
    with safe_open(str(base_dir / "base.safetensors"), "pt") as f:
        sd = {k[len("encoder.") :]: f.get_tensor(k).float() for k in f.keys() if k.startswith("encoder.")}  # noqa: SIM118
    enc.load_state_dict(sd)
    return enc.requires_grad_(False)


def load_features(root: Path, data: Path | None = None, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Every cached output in ``root``; with ``data``, refuses a cache computed from another
    data directory (a cache written before its ``source.json`` existed is taken as is).

    With ``mmap`` (the default) the tensors are views of the memory-mapped shards: the pages a
    batch reads come from the OS's file cache, which it can drop and read again under memory
    pressure, instead of the whole cache being copied into the process's own memory, and a
    second process reading the same cache shares those pages (2.2 GB of shards, every tensor
    read once: 150 MB of anonymous memory mapped, 2,346 MB copied; 2026-12-07). The shards
    must stay in place while the tensors are in use (:func:`cache_features` only adds new ones)."""
    if data is not None:
        check_source(root, data)
    feats: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("feats.*.pt")):
        feats |= torch.load(f, weights_only=True, mmap=mmap)
    return feats


def cached_ids(root: Path) -> set[str]:
    """The item ids cached in ``root``, read from memory-mapped shards: a resumed
    :func:`cache_features` needs only the ids, not the tensors (4 GB on the full data)."""
    ids: set[str] = set()
    for f in sorted(root.glob("feats.*.pt")):
        ids |= torch.load(f, weights_only=True, mmap=True).keys()
    return ids


@torch.inference_mode()
def cache_features(data: Path, out: Path, base_dir: Path, shard_size: int = 1000, say=print) -> int:  # type: ignore[no-untyped-def]
    out.mkdir(parents=True, exist_ok=True)
    check_source(out, data)
    have = cached_ids(out)
    if not have:  # a new cache names its data; one from before source.json is not claimed for this data
        (out / SOURCE).write_text(json.dumps({"data": str(data.resolve())}) + "\n")
    todo = [it for it in load_manifest(data) if it["id"] not in have]
    enc = load_encoder(base_dir)
    n_shard = len(list(out.glob("feats.*.pt")))
    buf: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for i, item in enumerate(todo):
        mel = log_mel(load_audio(data / item["audio"]))[None]
        h, _ = enc(mel)
        buf[item["id"]] = h[0].half().clone()
        if len(buf) == shard_size or i == len(todo) - 1:
            torch.save(buf, out / f"feats.{n_shard}.pt")
            n_shard += 1
            buf = {}
            say(f"{i + 1}/{len(todo)} items, {time.perf_counter() - t0:.0f} s")
    return len(todo)


def main() -> None:
    from ..loading import cache_dir

    ap = argparse.ArgumentParser(description="cache frozen encoder outputs for training")
    ap.add_argument("--data", type=Path, default=cache_dir() / "train" / "data")
    ap.add_argument("--out", type=Path, default=cache_dir() / "train" / "feats")
    ap.add_argument("--base", type=Path, default=cache_dir() / "osum-mini")
    args = ap.parse_args()
    cache_features(args.data, args.out, args.base)


if __name__ == "__main__":
    main()
