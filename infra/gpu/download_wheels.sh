#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels `infra/gpu/run_on_device.sh` installs on a GPU machine
# without internet (CPython 3.12, x86_64 Linux). That machine already has torch (CUDA), tokenizers, safetensors,
# huggingface_hub (>= 1.31), numpy, pillow, fsspec, typer, rich, tqdm and pyyaml; it lacks pydantic and runs an
# older transformers than the 5.23 vlpipe is tested with (5.23 accepts huggingface_hub 1.31-2.x, so the hub
# stays). Usage (from the repository root): bash infra/gpu/download_wheels.sh [DIR, default .whl]
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
wheels=(
  pydantic==2.14.3
  pydantic_core==2.50.4
  annotated_types==0.8.0
  typing_inspection==0.4.5
  typing_extensions==4.16.0   # pydantic 2.14 needs >= 4.16
  transformers==5.23.0
  regex==2026.11.15           # transformers 5.23 needs >= 2025.10.22
  setuptools==84.2.1          # builds vlpipe there (pip install --no-build-isolation); a bare python3 may lack it
)
for wheel in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "$wheel"
done
ls -l "$dest"
