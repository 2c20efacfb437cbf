#!/usr/bin/env bash
# Run `make gpu-check`'s checks on a bare GPU machine (no internet, no vlpipe installed), from the repository
# root, with the wheels `infra/gpu/download_wheels.sh` put in .whl/. Writes report.json under $OUT (default
# ./gpu-check-out) and exits 1 when a check failed (skipped checks do not fail it).
# Extra arguments go to the check, e.g. `--peak-tflops 989` or `--reduced`.
set -euo pipefail
site=/tmp/site
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$site" "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# setup.py maps the top-level folders to vlpipe.<folder>; --no-build-isolation builds with the setuptools just
# installed into $site (PYTHONPATH reaches pip's build subprocess).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$site" .  # --upgrade: a rerun replaces it
cd /tmp  # import vlpipe from $site, never the checkout's top-level folders
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
set -o pipefail
python3 -m vlpipe.components.training.gpu_check --out "$out" "$@" 2>&1 | tee "$out/gpu-check.log"
