"""Metadata and spread statistics for benchmark JSON files (docs/data), shared by every benchmark.

Three functions, no third-party imports (torch is used only if the caller already imported it):

    import benchmeta

    meta = benchmeta.meta()                 # command, machine, UTC date, git commit
    stats = benchmeta.spread(samples_us)    # n, median, p10, p90, p99, min, max, mean
    benchmeta.write_json(path, {"meta": meta, "rows": rows})   # meta added if missing

``meta(extra=None)`` returns::

    {
      "schema": 2,                              # report.py: files with "schema" use this layout
      "benchmark": "bench_moe.py",              # script file name
      "command": "python3 benchmarks/bench_moe.py --gpus 2 --json moe.json",
      "date_utc": "2026-12-01T10:00:00Z",
      "git": {"commit": "23b9f29...", "dirty": false},   # commit None outside a git checkout
      "machine": {
        "hostname": ..., "os": ..., "python": ..., "cpu_model": ..., "cpu_count": ...,
        "mem_gib": ..., "gpus": ["NVIDIA H100 80GB HBM3", ...], "gpu_count": 2,
        "driver": "580.65", "torch": "2.11.0", "cuda": "13.0", "nccl": "2.28.3"
      },
      ...extra
    }

GPU names come from torch when ``torch`` is already in ``sys.modules`` (so a CPU benchmark
does not import it), else from ``nvidia-smi`` if present, else ``[]``.

``spread(xs)`` takes raw samples (any unit; the caller names the unit in its keys) and returns
the median, the 10th / 90th / 99th percentiles (nearest rank: the sample at ``int(q * n)`` of
the sorted list, as the benchmarks have always computed p99), min, max, mean and n. An empty
list gives ``{"n": 0}``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["SCHEMA", "meta", "spread", "write_json", "pct"]

#: Layout version of files written through `meta` (report.py reads old files without it too).
SCHEMA = 2

_REPO = Path(__file__).resolve().parent.parent


def pct(sorted_xs: List[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def spread(xs: Iterable[float]) -> Dict[str, float]:
    """Median, p10, p90, p99, min, max, mean and n of raw samples (see the module docstring)."""
    s = sorted(float(x) for x in xs)
    n = len(s)
    if n == 0:
        return {"n": 0}
    mid = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    return {
        "n": n,
        "median": mid,
        "p10": pct(s, 0.10),
        "p90": pct(s, 0.90),
        "p99": pct(s, 0.99),
        "min": s[0],
        "max": s[-1],
        "mean": sum(s) / n,
    }


def _run(cmd: List[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git() -> Dict[str, Any]:
    commit = os.environ.get("STOLON_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"], _REPO)
    dirty = None
    if commit and not os.environ.get("STOLON_GIT_COMMIT"):
        st = _run(["git", "status", "--porcelain", "--untracked-files=no"], _REPO)
        dirty = bool(st) if st is not None else None
    return {"commit": commit, "dirty": dirty}


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def _gpus() -> Dict[str, Any]:
    out: Dict[str, Any] = {"gpus": [], "gpu_count": 0}
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            out["torch"] = torch.__version__
            out["cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                n = torch.cuda.device_count()
                out["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
                out["gpu_count"] = n
                try:
                    v = torch.cuda.nccl.version()
                    out["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
                except Exception:
                    pass
        except Exception:
            pass
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if smi:
        rows = [r.split(",") for r in smi.splitlines() if r.strip()]
        if not out["gpus"]:
            out["gpus"] = [r[0].strip() for r in rows]
            out["gpu_count"] = len(rows)
        if rows and len(rows[0]) > 1:
            out["driver"] = rows[0][1].strip()
    return out


def meta(extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The metadata block of a benchmark JSON file (see the module docstring)."""
    argv = [Path(sys.argv[0]).name] + sys.argv[1:] if sys.argv and sys.argv[0] else []
    script = sys.argv[0] if sys.argv else ""
    try:
        rel = str(Path(script).resolve().relative_to(_REPO))
    except ValueError:
        rel = script
    machine: Dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_gib": _mem_gib(),
    }
    machine.update(_gpus())
    m: Dict[str, Any] = {
        "schema": SCHEMA,
        "benchmark": argv[0] if argv else None,
        "command": " ".join(["python3", rel] + [shlex.quote(a) for a in sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": _git(),
        "machine": machine,
    }
    if extra:
        m.update(extra)
    return m


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Writes ``payload`` (``meta`` added when missing) as indented JSON to ``path``."""
    payload = dict(payload)
    payload.setdefault("meta", meta())
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=1, default=_default) + "\n")


def _default(o: Any) -> Any:
    for attr in ("tolist", "item"):  # numpy arrays and scalars, torch scalars
        if hasattr(o, attr):
            return getattr(o, attr)()
    return str(o)
