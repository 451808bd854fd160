"""How long a model takes to load, and the memory it holds, as `osum-serve` and `osum transcribe` load it.

Each configuration loads in a fresh process (so imports, the allocator and the peak are its own)
and prints one table row: wall seconds from the first import to a ready model, resident memory
once loaded, and the peak while loading (``VmHWM``: the safetensors file read whole, and one
layer at a time in fp32 while it is converted). The process also imports torch and transformers:
a CLI invocation pays all of it; a server pays it once at start.

    python load_tests/bench_load.py [--model osum-mini] [--quantize int8,none] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
t = time.perf_counter()
from osum.loading import load_model
model = load_model(sys.argv[1], "cpu", sys.argv[2])  # held while measuring
seconds = time.perf_counter() - t
status = open("/proc/self/status").read()
kb = lambda key: int(status.split(key + ":")[1].split()[0])
print(json.dumps({"seconds": seconds, "rss": kb("VmRSS") / 1e6, "peak": kb("VmHWM") / 1e6}))
"""


def load_once(model: str, quantize: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, model, quantize], capture_output=True, text=True, check=True,
                         timeout=600)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="osum-mini")
    ap.add_argument("--quantize", default="int8,none", help="comma-separated: int8, none, auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"| model | LLM | load (s), best of {args.repeats} | resident once loaded (GB) | peak while loading (GB) |")
    print("|---|---|---:|---:|---:|")
    for q in args.quantize.split(","):
        runs = [load_once(args.model, q) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        llm = {"int8": "int8", "none": "fp32 (CPU)", "auto": "auto"}[q]
        print(f"| {args.model} | {llm} | {best['seconds']:.1f} | {best['rss']:.2f} | {max(r['peak'] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
