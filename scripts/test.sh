#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the whole test suite: cargo test, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== cargo test"
cargo test --workspace --exclude stolon-python
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
