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
# the same code for the server and for the light client SDK (which must not import the server)
TARGETS = {OUT: "streaming.proto", ROOT / "clients" / "python" / "osum_client" / "proto": "osum_client.proto"}
FILES = ("speech_pb2.py", "speech_pb2.pyi", "speech_pb2_grpc.py")


def generate(out: Path, package: str = "streaming.proto") -> None:
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
        text = text.replace("from osum.speech.v1 import speech_pb2", f"from {package} import speech_pb2")
        (out / name).write_text(text)


def stale() -> list[str]:
    bad = []
    for out, package in TARGETS.items():
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), package)
            bad += [str(out / n) for n in FILES if not (out / n).is_file() or (Path(tmp) / n).read_text() != (out / n).read_text()]
    return bad


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
    for out, package in TARGETS.items():
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), package)
            out.mkdir(parents=True, exist_ok=True)
            for n in FILES:
                (out / n).write_text((Path(tmp) / n).read_text())


if __name__ == "__main__":
    main()
