#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the whole test suite: cargo test, then pytest against
# the x86_64 release wheel (scripts/wheels.sh) installed into a fresh venv, not the editable
# build. STOLON_TEST_EDITABLE=1 runs pytest in .venv (the editable build) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The same nvcc setup.sh installed, so cargo test builds the MoE kernels too.
NVCC="$(.venv/bin/python -c 'import nvidia, os; print(next(p for d in nvidia.__path__ for p in [os.path.join(d, "cu13", "bin", "nvcc")] if os.path.isfile(p)))')"
export NVCC STOLON_REQUIRE_KERNELS=1
# The CUDA headers from the same packages, for the driver ABI test (cuda/tests/abi_layout.rs),
# which then must run instead of printing SKIP.
STOLON_CUDA_INCLUDE="$(dirname "$(dirname "$NVCC")")/include"
export STOLON_CUDA_INCLUDE
echo "== lint"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy -p stolon
echo "== cargo test"
cargo test --workspace --exclude stolon-python
unset NVCC STOLON_REQUIRE_KERNELS STOLON_CUDA_INCLUDE
PYDEPS=(pytest hypothesis numpy pytest-timeout ruff mypy typing_extensions ml_dtypes matplotlib)
# torch (used on the CPU) for the KV-cache end-to-end test's small transformer; GPU tests skip
# without GPUs. The wheel from PyPI brings its CUDA libraries (a few GB), needed to import it.
TORCH="torch==2.11.*"
if [ "${STOLON_TEST_EDITABLE:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q "$TORCH"
  echo "== pytest (editable build in .venv)"
  exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
fi
echo "== wheel"
scripts/wheels.sh x86_64
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
whl="$(ls -t dist/stolon-"$version"-cp39-abi3-manylinux_2_28_x86_64.whl | head -1)"
rm -rf .venv-wheeltest
python3 -m venv .venv-wheeltest
.venv-wheeltest/bin/python -m pip install -q --upgrade pip >/dev/null
.venv-wheeltest/bin/python -m pip install -q "$whl" "${PYDEPS[@]}" "$TORCH"
echo "== pytest (installed $whl)"
# The tests assert that stolon comes from the wheel and that it carries both kernel builds.
export STOLON_EXPECT_WHEEL=1 STOLON_EXPECT_MOE_KERNELS=cuda12,cuda13
.venv-wheeltest/bin/python -m pytest -q -p no:cacheprovider "$@"
