#!/usr/bin/env bash
# Builds the release wheels into dist/: one abi3 wheel for x86_64 and one for aarch64, both
# manylinux_2_28 (glibc 2.28+: RHEL 8, Ubuntu 20.04, Debian 11 and newer), from this x86_64
# machine. aarch64 is cross-compiled with maturin's zig linker (ziglang from PyPI); nothing of
# the target system is linked (libfabric, libibverbs, CUDA and GDRCopy are loaded at run time).
#
# Each wheel carries the MoE kernels twice: a fatbin built by CUDA 12.8 (NVRTC + nvFatbin from
# PyPI: PyPI has no CUDA 12 nvcc driver) and one built by nvcc 13.0, each with cubins for sm_80,
# sm_90a and sm_100a plus compute_80 PTX; the library loads the newest one the driver supports.
#
#   scripts/wheels.sh                 # both wheels
#   scripts/wheels.sh x86_64          # one (x86_64 or aarch64)
#
# Then `auditwheel show` checks each wheel's tag and that it needs nothing outside the policy.
# Tools go to .venv-wheels/ and .toolchains/ (ignored); cargo builds into target-wheels/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ARCHES=("$@")
if [ ${#ARCHES[@]} -eq 0 ]; then ARCHES=(x86_64 aarch64); fi
POLICY=manylinux_2_28

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
for p in python3-venv build-essential curl ca-certificates unzip; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
for a in "${ARCHES[@]}"; do
  case "$a" in x86_64|aarch64) ;; *) echo "wheels: unknown arch $a (x86_64, aarch64)" >&2; exit 2;; esac
  rustup target list --installed | grep -qx "$a-unknown-linux-gnu" \
    || rustup target add "$a-unknown-linux-gnu"
done

# Build tools, pinned.
if [ ! -x .venv-wheels/bin/python ]; then python3 -m venv .venv-wheels; fi
.venv-wheels/bin/python -m pip install -q --upgrade pip >/dev/null
.venv-wheels/bin/python -m pip install -q "maturin>=1.5,<2" "ziglang==0.13.0" "auditwheel==6.8.2"

# The two CUDA toolchains, each pinned to one release (mixed versions break the compilers).
T12="$ROOT/.toolchains/cuda-12.8"
T13="$ROOT/.toolchains/cuda-13.0"
if [ ! -f "$T12/.complete" ]; then
  rm -rf "$T12"
  .venv-wheels/bin/python -m pip install -q --target "$T12" "nvidia-cuda-nvrtc-cu12==12.8.93" \
    "nvidia-nvfatbin-cu12==12.8.90" "nvidia-cuda-runtime-cu12==12.8.90" \
    "nvidia-cuda-cccl-cu12==12.8.90"
  touch "$T12/.complete"
fi
if [ ! -f "$T13/.complete" ]; then
  rm -rf "$T13"
  .venv-wheels/bin/python -m pip install -q --target "$T13" "nvidia-cuda-nvcc==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-crt==13.0.88" \
    "nvidia-nvvm==13.0.88"
  touch "$T13/.complete"
fi
export NVCC="$T13/nvidia/cu13/bin/nvcc"
export STOLON_NVRTC_ROOTS="$T12"
export STOLON_BUILD_PYTHON="$ROOT/.venv-wheels/bin/python"
export STOLON_REQUIRE_KERNELS=cuda12,cuda13
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-wheels}"
unset CUDA_HOME CUDA_PATH VIRTUAL_ENV
export PATH="$ROOT/.venv-wheels/bin:$PATH"

mkdir -p dist
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
for a in "${ARCHES[@]}"; do
  rm -f dist/stolon-"$version"-*"$a".whl
  start=$(date +%s)
  # --zig links against glibc 2.28 stubs; --compatibility makes maturin refuse newer symbols.
  nice -n 10 maturin build --release --strip --zig --target "$a-unknown-linux-gnu" \
    --compatibility "$POLICY" --interpreter python3 -o dist -q
  secs=$(( $(date +%s) - start ))
  whl="$(ls -t dist/stolon-"$version"-*"$a".whl | head -1)"
  echo "== $whl: $(du -k "$whl" | cut -f1) KiB, built in ${secs}s"
  show="$(auditwheel show "$whl")"
  echo "$show"
  # The proof: the tag is manylinux_2_28 (or older), and auditwheel agrees that the wheel is
  # consistent with it (needs no library or symbol version outside the policy).
  case "$whl" in *manylinux_2_28_"$a"*|*manylinux_2_17_"$a"*|*manylinux2014_"$a"*) ;;
    *) echo "wheels: $whl is not tagged $POLICY or older" >&2; exit 1;; esac
  echo "$show" | tr '\n' ' ' | grep -Eq "consistent with the following platform tag: \"(manylinux_2_(1[0-9]|2[0-8])|manylinux2014)_$a\"" \
    || { echo "wheels: auditwheel does not confirm $POLICY for $whl" >&2; exit 1; }
  # Both kernel builds are embedded (the fatbins' kernel names appear once per build).
  n=$(unzip -p "$whl" 'stolon/_native.abi3.so' | grep -a -o "moe_dispatch_fused" | wc -l)
  [ "$n" -ge 2 ] || { echo "wheels: $whl lacks a kernel build ($n)" >&2; exit 1; }
done
ls -l dist/
