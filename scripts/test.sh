#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the whole test suite: cargo test, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== cargo test"
cargo test --workspace --exclude stolon-python
# torch (used on the CPU) for the KV-cache end-to-end test's small transformer; GPU tests skip
# without GPUs. The wheel from PyPI brings its CUDA libraries (a few GB), needed to import it.
.venv/bin/python -m pip install -q "torch==2.11.*"
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
