#!/usr/bin/env bash
# The engine benchmark on an NVIDIA GPU, in one command: `bash bench/gpu.sh [bench.engine options]`.
# Builds the CUDA variant of llama-cpp-python and of llama-server (same llama.cpp sources and flags,
# kept in the build cache per CPU), shows `ktulhu doctor` (it must say every layer is on the GPU),
# then runs the same side-by-side benchmark as `make bench-engine` with every layer offloaded.
# Needs the CUDA toolkit (nvcc) and a driver. Results: bench/results/engine-gpu.json, and bench/results/gpu/ (tables and plot, the layout of docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
    echo "bench/gpu.sh: nvcc not found; install the CUDA toolkit (and put it on PATH) first" >&2
    exit 2
fi
make setup GPU=cuda
make model
.venv/bin/ktulhu doctor
.venv/bin/pip install --disable-pip-version-check -q -e '.[bench]'
LLAMA_CLI_NGL=-1 .venv/bin/python -m bench.engine --out bench/results/engine-gpu.json --docs bench/results/gpu "$@"
