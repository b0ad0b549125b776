#!/usr/bin/env bash
# One command on a GPU host: install the wheel built elsewhere (dist/*.whl, not an editable
# build), run the GPU tests for the GPU count present, a short smoke run of every GPU
# benchmark (each checks its outputs), and write one summary JSON.
#
#   scripts/gpu_check.sh                      # from the repository root, wheel in dist/
#   STOLON_GIT_COMMIT=<sha> scripts/gpu_check.sh   # commit for the metadata (no .git there)
#
# Needs python3 with torch (CUDA). Optional: pytest and hypothesis (else the test step is
# recorded as skipped); wheels under dist/deps/ are installed too (--no-deps), e.g. pytest.
# Writes $OUT/gpu_check_summary.json if $OUT is set, else docs/data/gpu_check_summary.json;
# each step's log and the smoke runs' JSON next to it, under gpu_check/. Every step has a
# timeout; a failed step is recorded and the next one runs; the whole run stays within
# GPU_CHECK_BUDGET seconds (default 470).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-470}"
if [ -n "${OUT:-}" ]; then DEST="$OUT"; else DEST="$ROOT/docs/data"; fi
WORK="${OUT:-/tmp}/gpu_check"
mkdir -p "$DEST" "$WORK"
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
SITE="${STOLON_WHEEL_DIR:-/tmp/stolon-wheel}"

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME TIMEOUT_S CMD...: runs CMD with a timeout (capped by what is left of the budget),
# logs to $WORK/NAME.log, appends {"name","cmd","rc","status","seconds"} to $STEPS.
step() {
  local name="$1" limit="$2"; shift 2
  local left; left=$(( $(remaining) - 15 ))
  local log="$WORK/$name.log"
  if [ "$left" -lt 20 ]; then
    "$PY" -c 'import json,sys; print(json.dumps({"name":sys.argv[1],"cmd":sys.argv[2],"status":"skipped","rc":None,"seconds":0,"note":"no time left in the budget"}))' "$name" "$*" >> "$STEPS"
    echo "== $name: skipped (budget)"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "== $name (timeout ${limit}s): $*"
  local t0; t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local t1; t1=$(date +%s.%N)
  tail -n 5 "$log"
  "$PY" - "$name" "$*" "$rc" "$t0" "$t1" "$log" >> "$STEPS" <<'EOF'
import json, sys
name, cmd, rc, t0, t1, log = sys.argv[1:]
rc = int(rc)
status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
tail = open(log, errors="replace").read().splitlines()[-15:]
print(json.dumps({"name": name, "cmd": cmd, "rc": rc, "status": status,
                  "seconds": round(float(t1) - float(t0), 1), "log_tail": tail}))
EOF
  return 0
}

# --- install the wheel into a target directory, then import it from there -------------------
# the newest stolon wheel for this machine's architecture (dist/ may hold x86_64 and aarch64)
WHEEL=$(ls -t dist/stolon-*"$(uname -m)"*.whl 2>/dev/null | head -n 1)
[ -z "$WHEEL" ] && WHEEL=$(ls -t dist/stolon-*.whl 2>/dev/null | head -n 1)
if [ -z "$WHEEL" ]; then
  "$PY" -c 'import json; print(json.dumps({"name":"install","status":"failed","rc":1,"seconds":0,"note":"no wheel in dist/"}))' >> "$STEPS"
else
  rm -rf "$SITE"
  step install 120 "$PY" -m pip install --no-deps --no-index --target "$SITE" "$WHEEL" $(ls dist/deps/*.whl 2>/dev/null)
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
step import 60 "$PY" -c "import stolon, sys; f = stolon.__file__; print(f); sys.exit(0 if f.startswith('$SITE') else 'stolon imported from ' + f + ', not the wheel')"

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
G=$(( NGPU >= 2 ? 2 : 1 ))
echo "== $NGPU GPU(s) visible; benchmarks on $G"

# --- GPU tests (those needing more GPUs than present skip with their reason) ---------------
if "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
  step gpu_tests 170 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider \
    tests/test_gpu.py tests/test_kvcache_gpu.py tests/test_weights_gpu.py tests/test_moe_gpu.py
else
  "$PY" -c 'import json; print(json.dumps({"name":"gpu_tests","status":"skipped","rc":None,"seconds":0,"note":"pytest or hypothesis not installed (put their wheels in dist/deps/)"}))' >> "$STEPS"
fi

# --- smoke runs of every GPU benchmark (each exits non-zero if its outputs are wrong) -------
step bench_gpu 70 "$PY" benchmarks/bench_gpu.py --gpus "$G" --quick --json "$WORK/bench_gpu.json"
step bench_moe 110 "$PY" benchmarks/bench_moe.py --gpus "$G" --quick --configs decode,prefill \
  --json "$WORK/bench_moe.json"
step bench_kvcache 80 "$PY" benchmarks/bench_kvcache.py --gpus "$G" --quick --paths nvlink \
  --json "$WORK/bench_kvcache.json"
step bench_weights_gpu 80 "$PY" benchmarks/bench_weights_gpu.py --gpus "$G" --quick \
  --paths nvlink --json "$WORK/bench_weights_gpu.json"

# --- the summary ---------------------------------------------------------------------------
"$PY" - "$STEPS" "$WORK" "$DEST/gpu_check_summary.json" "$NGPU" "$WHEEL" <<'EOF'
import json, os, sys
from pathlib import Path
steps_file, work, dest, ngpu, wheel = sys.argv[1:]
sys.path.insert(0, "benchmarks")
try:
    import torch  # noqa: F401  (for the GPU names in the metadata)
except Exception:
    pass
import benchmeta
steps = [json.loads(l) for l in open(steps_file) if l.strip()]
for s in steps:
    name = s["name"]
    p = Path(work) / f"{name}.json"
    if p.exists():
        try:
            s["results"] = json.loads(p.read_text())
            s["results_file"] = str(p)
        except ValueError:
            pass
meta = benchmeta.meta({"benchmark": "gpu_check.sh", "wheel": os.path.basename(wheel) if wheel else None})
meta["command"] = "scripts/gpu_check.sh"
out = {
    "meta": meta,
    "gpus_visible": int(ngpu),
    "all_ok": all(s["status"] in ("ok", "skipped") for s in steps),
    "failed": [s["name"] for s in steps if s["status"] not in ("ok", "skipped")],
    "steps": steps,
}
benchmeta.write_json(dest, out)
print(f"== summary: {dest} ({'all ok' if out['all_ok'] else 'failed: ' + ', '.join(out['failed'])})")
for s in steps:
    print(f"   {s['name']:<20} {s['status']:<8} {s.get('seconds', 0):>6} s")
EOF
exit 0
