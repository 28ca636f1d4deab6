#!/usr/bin/env bash
# The GPU check anyone can run (issue 11): CUDA-marked tests, fp16/fp32/bf16 correctness for texts and images,
# the encode throughput table for ViT-B/32 and ViT-L/14, fine-tuning and the torch kNN engine (issue 27), into one
# JSON under benchmarks/results/.
#
#   benchmarks/gpu_check.sh [--device cpu] [--tiny] [--steps STEP,...] [OUT.json]
#
# Uses $PYTHON when set, else .venv/bin/python when there is one, else python3 (the GPU machine: install .gpu-carry
# first, see README). Exits 1 when any step recorded an error. Whenever it runs on a GPU, commit its JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
python=${PYTHON:-$python}
export OMP_WAIT_POLICY=PASSIVE PYTHONWARNINGS="ignore:pkg_resources is deprecated:UserWarning"
exec timeout 600 "$python" benchmarks/gpu_check.py "$@"
