#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index: fills .whl/ (in .gitignore) with what
# resnet-batch needs beyond an image that already has Python 3.12, torch, torchvision, numpy,
# pyarrow, pandas, fsspec, pillow, scikit-image, pyyaml, aiohttp and pytest (a typical PyTorch GPU
# image). Run it where pip works, then copy the repository with .whl/ to the GPU machine:
#
#   bash benchmarks/device_wheels.sh            # writes .whl/ and prints its size
#   OUT=... bash benchmarks/gpu_check.sh        # on the GPU machine: installs .whl/ into /tmp/site itself
#
# Ray's wheel (79 MB) is rewritten without ray/jars/ray_dist.jar (30 MB, only for Java workers), so
# that the whole upload stays under 64 MiB (about 49 MiB of wheels, plus the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=.whl
rm -rf "$DEST" && mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PY=${PY:-.venv/bin/python}
# Pinned like pyproject.toml: Ray, and what Ray core and our config need that the image lacks.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" \
    ray==2.60.0 pydantic==2.14.3 "pydantic-core==$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
    annotated-types typing-inspection jsonschema jsonschema-specifications referencing rpds-py
"$PY" - "$DEST" <<'EOF'
"""Rewrite Ray's wheel without the Java jar (and its RECORD line)."""
import sys
import zipfile
from pathlib import Path

wheel = next(Path(sys.argv[1]).glob("ray-*.whl"))
slim = wheel.with_suffix(".slim")
drop = "ray/jars/"
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if info.filename.startswith(drop):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not l.startswith(drop.encode()))
        dst.writestr(info, data)
slim.replace(wheel)
print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB without {drop}")
EOF
du -sh "$DEST"
ls "$DEST"
