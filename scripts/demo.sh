#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the demo: a second process writes 16 x 64 MiB into
# this one over the default provider (tcp;ofi_rxm, 2 domains); both sides verify; GB/s printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m stolon info
.venv/bin/python -m stolon demo "$@"
