"""Generate the Python gRPC code from ``protos/`` into this folder.

    python -m streaming.proto.generate          # rewrite the generated files
    python -m streaming.proto.generate --check  # exit 1 if they are stale (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("osum/speech/v1/speech.proto")
OUT = Path(__file__).resolve().parent
FILES = ("speech_pb2.py", "speech_pb2.pyi", "speech_pb2_grpc.py")


def generate(out: Path) -> None:
    from grpc_tools import protoc

    code = protoc.main([
        "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={out}", f"--pyi_out={out}",
        f"--grpc_python_out={out}", str(ROOT / "protos" / PROTO),
    ])  # fmt: skip
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")
    gen = out / PROTO.parent
    for name in FILES:
        text = (gen / name).read_text()
        # generated imports are absolute to the proto package; ours live in streaming.proto
        text = text.replace("from osum.speech.v1 import speech_pb2", "from streaming.proto import speech_pb2")
        (out / name).write_text(text)


def stale() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [n for n in FILES if (Path(tmp) / n).read_text() != (OUT / n).read_text()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        bad = stale()
        if bad:
            print("stale generated code: " + ", ".join(bad) + " (run python -m streaming.proto.generate)")
            sys.exit(1)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for n in FILES:
            (OUT / n).write_text((Path(tmp) / n).read_text())


if __name__ == "__main__":
    main()
