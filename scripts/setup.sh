#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine is missing and builds stolon into ./.venv.
#   apt: libfabric (runtime, fi_info, headers for the ABI test), iperf3 (benchmark baseline),
#        iproute2 (network-namespace testbed), python3-venv, a C toolchain.
#   Rust: uses the cargo on PATH (or ~/.cargo/bin); installs rustup if there is none.
#   Python: a venv with maturin, pytest, hypothesis, numpy, and nvcc 13.0 from PyPI (for the MoE
#           kernels); then builds the extension (release).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

pkgs=(libfabric1 libfabric-bin libfabric-dev libibverbs-dev iperf3 iproute2 python3-venv python3-dev
      build-essential pkg-config curl ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no cargo found; installing Rust with rustup"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "maturin>=1.5,<2" pytest hypothesis numpy pytest-timeout \
  ruff mypy typing_extensions ml_dtypes
# The CUDA compiler for the MoE kernels (p2p-all-to-all/build.rs), from PyPI: all five packages
# pinned to one CUDA release (mixed versions break nvcc). No GPU is needed to compile.
.venv/bin/python -m pip install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
NVCC="$(.venv/bin/python -c 'import nvidia, os; print(next(p for d in nvidia.__path__ for p in [os.path.join(d, "cu13", "bin", "nvcc")] if os.path.isfile(p)))')"
export NVCC
# A build without kernels must fail here rather than pass unnoticed.
export STOLON_REQUIRE_KERNELS=1
# Builds the Rust extension and installs the package in editable mode into the venv.
VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin develop --release -q
echo "setup: stolon built into .venv"
