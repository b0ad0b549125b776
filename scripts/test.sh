#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the whole test suite: cargo test, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The same nvcc setup.sh installed, so cargo test builds the MoE kernels too.
NVCC="$(.venv/bin/python -c 'import nvidia, os; print(next(p for d in nvidia.__path__ for p in [os.path.join(d, "cu13", "bin", "nvcc")] if os.path.isfile(p)))')"
export NVCC STOLON_REQUIRE_KERNELS=1
echo "== cargo test"
cargo test --workspace --exclude stolon-python
# torch (used on the CPU) for the KV-cache end-to-end test's small transformer; GPU tests skip
# without GPUs. The wheel from PyPI brings its CUDA libraries (a few GB), needed to import it.
.venv/bin/python -m pip install -q "torch==2.11.*"
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
