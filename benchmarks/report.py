#!/usr/bin/env python3
"""Tables and plots for docs/benchmarks.md, regenerated from the JSON files in docs/data.

    python benchmarks/report.py                  # rewrite the marked tables, draw docs/plots/*.png
    python benchmarks/report.py --check          # exit 1 if docs/benchmarks.md is out of date
    python benchmarks/report.py --print moe_h100x2_full_2026-11-27c.json   # one file's table

Tables. docs/benchmarks.md holds blocks of the form::

    <!-- report FILE.json -->
    (generated: replaced on every run)
    <!-- /report -->

and the script replaces each block's body with the table of ``docs/data/FILE.json`` (its
command, machine, date and commit, then the numbers). Nothing outside the blocks is touched.

Plots. One PNG per benchmark family in docs/plots (``engine``, ``multinic``, ``gpu``, ``moe``,
``kvcache``, ``weights``): bandwidth or latency against size (or a bar chart where a run has
one size), every baseline of the same run on the same axes. A family's plot uses the files its
blocks in the doc name (all files of the family when the doc names none). Needs matplotlib;
without it the tables are still written and the plots are skipped with a message.

Files and families. A file's family comes from ``meta.benchmark`` (files written through
benchmeta.py), else its ``family`` key, else its name's prefix (``gpu_bench_``, ``moe_``,
``kvcache_``, ``weights_plan_``, ``weights_``, ``engine_``, ``multinic_``, ``gpu_check``).
Readers exist for the layouts of the files already in docs/data (bench_moe's ``configs``,
the ``meta`` + ``rows`` files of bench_gpu / bench_kvcache / bench_weights_gpu, the planner's
file) and for new files in the generic layout below, which the engine and multinic families
use::

    {"meta": benchmeta.meta(),
     "rows": [{"series": "tcp single", "size_bytes": 65536,
               "gbit_per_s": 21.5 or {"median": ..., "p10": ..., "p90": ..., ...}, ...}],
     "baselines": [{"series": "iperf3", "gbit_per_s": 20.2}]}   # size_bytes optional

Generic rows are tabulated as series, size and every metric (``*_per_s``, ``*_us``, ``*_s``,
``*_pct``, ``fraction*``; p99 too for ``*_us`` spreads, and ``verified`` where rows have it),
one table per value of the rows' optional ``table`` key, then the baselines, then an optional
``targets`` list (``{"target", "sense", "bound", "measured", "met"}``) as a met / not met
table; plotted as one line per series against ``size_bytes`` for the first metric in
``PLOT_METRICS`` present, baselines without a size as horizontal lines. Values may be numbers
or benchmeta.spread() dicts (median plotted, p10-p90 as error bars).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("engine", "multinic", "gpu", "moe", "kvcache", "weights")
PLOT_METRICS = ("gbit_per_s", "gb_per_s", "writes_per_s", "latency_us", "us")

BLOCK = re.compile(r"(<!-- report (\S+?) -->\n)(.*?)(<!-- /report -->)", re.S)

_BY_SCRIPT = {
    "bench_engine.py": "engine",
    "multinic.py": "multinic",
    "bench_gpu.py": "gpu",
    "bench_moe.py": "moe",
    "bench_kvcache.py": "kvcache",
    "bench_weights_gpu.py": "weights",
    "bench_weights_plan.py": "weights_plan",
    "gpu_check.sh": "gpu_check",
}
_BY_PREFIX = (
    ("gpu_check", "gpu_check"),
    ("gpu_bench", "gpu"),
    ("moe", "moe"),
    ("kvcache", "kvcache"),
    ("weights_plan", "weights_plan"),
    ("weights", "weights"),
    ("engine", "engine"),
    ("multinic", "multinic"),
)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def load(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        d = json.load(f)
    return d if isinstance(d, dict) else {"rows": d}


def family(name: str, d: Dict[str, Any]) -> str:
    """The benchmark family of file ``name`` with contents ``d``."""
    m = d.get("meta") if isinstance(d.get("meta"), dict) else {}
    if m.get("benchmark") in _BY_SCRIPT:
        return _BY_SCRIPT[m["benchmark"]]
    if isinstance(d.get("family"), str):
        return d["family"]
    for prefix, fam in _BY_PREFIX:
        if name.startswith(prefix):
            return fam
    return "other"


def med(v: Any) -> Optional[float]:
    """A number, or the median of a spread dict (or of the old {"median_us": ...} dicts)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, dict):
        for k in ("median", "median_us"):
            if isinstance(v.get(k), (int, float)):
                return float(v[k])
    return None


def _q(v: Any, q: str) -> Optional[float]:
    if isinstance(v, dict):
        for k in (q, q + "_us"):
            if isinstance(v.get(k), (int, float)):
                return float(v[k])
    return None


def fmt(x: Optional[float], nd: int = 1) -> str:
    if x is None:
        return ""
    if abs(x) >= 1000 and nd <= 1:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def size_str(n: Optional[float]) -> str:
    if n is None:
        return ""
    n = int(n)
    for unit, s in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {s}"
    return f"{n} B"


def header(name: str, d: Dict[str, Any]) -> str:
    """One line: command, machine, date and commit of a file, in whichever layout it has."""
    m = d.get("meta") if isinstance(d.get("meta"), dict) else {}
    cmd = m.get("command") or d.get("command") or ""
    date = m.get("date_utc") or m.get("date") or d.get("date") or ""
    mach = m.get("machine") if isinstance(m.get("machine"), dict) else {}
    gpus = mach.get("gpus") or m.get("gpus") or ([d["device"]] if d.get("device") else [])
    if gpus and len(set(gpus)) == 1:
        gdesc = f"{len(gpus)} x {gpus[0]}" if len(gpus) > 1 else gpus[0]
        if d.get("world") and len(gpus) == 1:
            gdesc = f"{d['world']} x {gpus[0]}"
    else:
        gdesc = ", ".join(gpus)
    cpu = mach.get("cpu_model") or d.get("machine") or d.get("host") or ""
    if mach.get("cpu_count"):
        cpu = f"{cpu}, {mach['cpu_count']} CPUs" if cpu else f"{mach['cpu_count']} CPUs"
    git = (m.get("git") or {}).get("commit") if isinstance(m.get("git"), dict) else None
    parts = [f"`{cmd}`" if cmd else "", gdesc, cpu if not gdesc else "", date]
    parts.append(f"commit {git[:10]}" if git else "commit not recorded")
    return f"Data: `docs/data/{name}`. " + "; ".join(p for p in parts if p) + "."


def table(head: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# tables per family
# ------------------------------------------------------------------------------------------------

MOE_ROWS = (
    # (label, table, key): the measure first, then the whole call, then the baselines
    ("stolon dispatch_send + dispatch_recv (issue's measure)", "stolon", "dispatch"),
    ("stolon dispatch(), one span", "stolon", "dispatch_whole"),
    ("stolon dispatch(overlap=True)", "stolon", "dispatch_overlapped"),
    ("stolon combine_send + combine_recv (issue's measure)", "stolon", "combine"),
    ("stolon combine(), one span", "stolon", "combine_whole"),
    ("stolon combine(overlap=True)", "stolon", "combine_overlapped"),
    ("NCCL graph, padded, unweighted fp32 sum: dispatch", "nccl_graph", "dispatch"),
    ("NCCL graph, padded, unweighted fp32 sum: combine", "nccl_graph", "combine"),
    ("NCCL graph, top-k weighted index_add_: dispatch", "nccl_graph_weighted", "dispatch"),
    ("NCCL graph, top-k weighted index_add_: combine", "nccl_graph_weighted", "combine"),
    ("NCCL eager: dispatch", "nccl_eager", "dispatch"),
    ("NCCL eager: combine", "nccl_eager", "combine"),
)

#: The targets of issue 5: decode latencies, prefill as a multiple of the NVLink floor.
MOE_TARGETS = {"decode": {"dispatch": 30.0, "combine": 35.0}, "prefill": {"ratio": 2.0}}


def moe_table(name: str, d: Dict[str, Any]) -> str:
    cfgs = d.get("configs") or {}
    names = sorted(cfgs, key=lambda n: cfgs[n].get("config", {}).get("tokens", 0))
    head = ["us, median / p99"] + [
        f"{n} ({cfgs[n].get('config', {}).get('tokens', '?')} tok)" for n in names
    ]
    rows = []
    for label, form, key in MOE_ROWS:
        cells, any_ = [], False
        for n in names:
            v = (cfgs[n].get(form) or {}).get(key)
            if med(v) is None:
                cells.append("")
                continue
            any_ = True
            cells.append(f"{fmt(med(v))} / {fmt(_q(v, 'p99'))}")
        if any_:
            rows.append([label] + cells)
    floor = [cfgs[n].get("floor_us") or {} for n in names]
    if any(floor):
        rows.append(
            ["NVLink floor: dispatch / combine"]
            + [f"{fmt(f.get('dispatch'))} / {fmt(f.get('combine'))}" if f else "" for f in floor]
        )
    for what in ("dispatch", "combine"):
        cells = []
        for n, f in zip(names, floor):
            st = cfgs[n].get("stolon") or {}
            split = med(st.get(what))
            best = min(
                (x for x in (med(st.get(what + k)) for k in ("", "_whole", "_overlapped")) if x),
                default=None,
            )
            tgt = MOE_TARGETS.get(n, {})
            if what in tgt and split is not None:
                ok = "met" if split <= tgt[what] else "**not met**"
                whole = med(st.get(what + "_whole"))
                cells.append(
                    f"target {tgt[what]:.0f}: send+recv {fmt(split)} {ok}"
                    + (f"; one span {fmt(whole)}" if whole is not None else "")
                )
            elif f.get(what) and best:
                r_split = split / f[what] if split else None
                txt = f"best {best / f[what]:.2f}x, send+recv {fmt(r_split, 2)}x"
                if "ratio" in tgt:
                    txt += " (target 2x: " + ("met" if best / f[what] <= 2 else "**not met**") + ")"
                cells.append(txt)
            else:
                cells.append("")
        if any(cells):
            rows.append([f"{what}: against target / floor"] + cells)
    checks = [cfgs[n].get("check") for n in names]
    if any(checks):
        rows.append(
            ["outputs checked against stolon.moe.reference"] + [_check_cell(c) for c in checks]
        )
    extra = []
    if d.get("peer_copy_gbps"):
        extra.append(f"peer copy {d['peer_copy_gbps']:.0f} GB/s")
    if d.get("world"):
        extra.append(f"{d['world']} GPUs")
    routing = d.get("routing")
    if routing:
        extra.append(f"routing: {routing}")
    note = ("; ".join(extra) + ".") if extra else ""
    return "\n".join(x for x in (header(name, d), note, "", table(head, rows)) if x is not None)


def _check_cell(c: Any) -> str:
    if not c:
        return "not checked"
    if c.get("error"):
        return f"**failed**: {c['error'][:80]}"
    if c.get("skipped"):
        return f"skipped: {c['skipped']}"
    forms = c.get("forms") or {}
    bad = [k for k, v in forms.items() if not v.get("ok")]
    return ("**failed**: " + ", ".join(bad)) if bad else "ok (" + ", ".join(forms) + ")"


def gpu_table(name: str, d: Dict[str, Any]) -> str:
    rows = d.get("rows") or []
    bw = [r for r in rows if r.get("op", "").startswith("nvlink_write") and "size_bytes" in r]
    batched = any("peer_copy_batched_gb_per_s" in r or "peer_copy_graph_gb_per_s" in r for r in bw)
    head = ["write size", "stolon NVLink GB/s", "peer copy GB/s (copy + sync each)"]
    if batched:
        head += ["peer copy GB/s (events around a batch)", "peer copy GB/s (batch in a CUDA graph)"]
    head += ["stolon / best peer copy", "stolon latency p50 / p99 us", "peer-copy latency us"]
    out = []
    for r in bw:
        peers = [r.get(k) for k in ("peer_copy_gb_per_s", "peer_copy_batched_gb_per_s",
                                    "peer_copy_graph_gb_per_s")]  # fmt: skip
        best = max((p for p in peers if isinstance(p, (int, float))), default=None)
        cells = [
            size_str(r["size_bytes"]) + (" (VMM)" if r["op"].endswith("vmm") else ""),
            fmt(r.get("gb_per_s"), 2),
            fmt(r.get("peer_copy_gb_per_s"), 2),
        ]
        if batched:
            cells += [fmt(r.get("peer_copy_batched_gb_per_s"), 2),
                      fmt(r.get("peer_copy_graph_gb_per_s"), 2)]  # fmt: skip
        lat = ""
        if r.get("latency_p50_us") is not None:
            lat = f"{fmt(r['latency_p50_us'])} / {fmt(r.get('latency_p99_us'))}"
        cells += [
            fmt(r["gb_per_s"] / best, 2) if best else "",
            lat,
            fmt(r.get("peer_copy_latency_us")),
        ]
        out.append(cells)
    other = []
    for r in rows:
        if r in bw:
            continue
        val = (f"{fmt(r['gb_per_s'], 2)} GB/s" if "gb_per_s" in r else
               f"p50 {fmt(r.get('latency_p50_us'))} us, "
               f"p99 {fmt(r.get('latency_p99_us'))} us")  # fmt: skip
        other.append([r.get("op", "?"), size_str(r.get("size_bytes")), val])
    m = d.get("meta") or {}
    note = ""
    if m.get("same_device"):
        note = ("One GPU: writer and receiver are two processes on the same device (CUDA IPC "
                "within one GPU); the 'peer copy' is a copy within that GPU.")  # fmt: skip
    parts = [header(name, d)] + ([note] if note else []) + ["", table(head, out)]
    if other:
        parts += ["", table(["other measurement", "size", "result"], other)]
    return "\n".join(p for p in parts if p is not None)


def kvcache_table(name: str, d: Dict[str, Any]) -> str:
    rows = d.get("rows") or []
    head = ["path", "prefill ms", "transfer after prefill ms", "streaming: extra after prefill ms",
            "one layer, paged path ms (GB/s)", "one layer at peer-copy rate ms (GB/s)",
            "extra / paged layer", "extra / peer-copy layer", "tokens equal"]  # fmt: skip
    out = []
    for r in rows:

        def ms(k: str, r: Dict[str, Any] = r) -> str:
            return fmt(r[k] * 1e3, 2) if isinstance(r.get(k), (int, float)) else ""

        link = r.get("link_layer_s")
        extra = r.get("extra_streaming_s")
        out.append([
            r.get("path", ""),
            ms("prefill_s"),
            ms("extra_after_prefill_s"),
            ms("extra_streaming_s"),
            f"{ms('one_layer_transfer_s')} ({fmt(r.get('layer_gb_per_s'), 1)})",
            f"{ms('link_layer_s')} ({fmt(r.get('link_gb_per_s'), 1)})" if link else "not measured",
            fmt(extra / r["one_layer_transfer_s"], 2)
            if extra and r.get("one_layer_transfer_s") else "",
            fmt(extra / link, 2) if extra and link else "",
            str(r.get("tokens_equal_single_process", "")),
        ])  # fmt: skip
    return "\n".join([header(name, d), "", table(head, out)])


def weights_table(name: str, d: Dict[str, Any]) -> str:
    rows = d.get("rows") or []
    ceil = (d.get("ceilings") or {}).get("peer_copy_gb_per_s")
    head = ["path", "layout", "T -> I", "model GB", "s / update (median)", "GB/s per inference GPU",
            "x peer copy", "NCCL gather + broadcast s", "speedup", "NCCL shards only s",
            "speedup", "cost model s (error)", "bit-exact"]  # fmt: skip
    out = []
    for r in rows:
        sh = r.get("baseline_shards_update_s")
        out.append([
            r.get("path", ""), r.get("layout", ""), f"{r.get('train')} -> {r.get('infer')}",
            fmt(r.get("model_gb_bf16"), 2), fmt(r.get("update_s"), 4),
            fmt(r.get("gb_per_s_per_infer_gpu"), 1), fmt(r.get("fraction_of_peer_copy"), 2),
            fmt(r.get("baseline_update_s"), 4),
            (fmt(r.get("speedup_over_baseline"), 2) + "x")
            if r.get("speedup_over_baseline") else "",
            fmt(sh, 4) if sh
            else (r.get("baseline_shards_error") or r.get("baseline_skipped") or ""),
            (fmt(r["update_s"] and sh / r["update_s"], 2) + "x") if sh else "",
            f"{fmt(r.get('model_update_s'), 4)} ({r.get('model_error', 0):+.0%})"
            if r.get("model_update_s") else "",
            "yes" if not r.get("verify_errors") else "**no**",
        ])  # fmt: skip
    note = f"Ceiling (in-process peer copy): {ceil:.1f} GB/s." if ceil else ""
    return "\n".join(x for x in (header(name, d), note, "", table(head, out)) if x is not None)


def weights_plan_table(name: str, d: Dict[str, Any]) -> str:
    cm, pl = d.get("cost_model") or {}, d.get("planner") or {}
    rows = [
        ["plan build s", fmt(pl.get("plan_s"), 2)],
        ["data ranges", str(pl.get("data_ranges", ""))],
        ["peak RSS GB", fmt(pl.get("peak_rss_gb"), 2)],
        ["modelled update s", fmt(cm.get("update_s"), 3)],
        ["bound", str(cm.get("bound", ""))],
    ]
    return "\n".join([header(name, d), "", table(["quantity", "value"], rows)])


def gpu_check_table(name: str, d: Dict[str, Any]) -> str:
    head = ["step", "status", "seconds", "note"]
    out = [[s.get("name", ""), s.get("status", ""), fmt(s.get("seconds"), 1),
            str(s.get("note", ""))[:120]] for s in d.get("steps", [])]  # fmt: skip
    return "\n".join([header(name, d), "", table(head, out)])


def _metrics(r: Dict[str, Any]) -> List[str]:
    keep = ("_per_s", "_us", "_s", "gbps", "_pct")
    return [
        k for k in r if (k.endswith(keep) or k.startswith("fraction")) and med(r[k]) is not None
    ]


def _generic_rows(rows: List[Dict[str, Any]]) -> str:
    metrics: List[str] = []
    for r in rows:
        metrics += [k for k in _metrics(r) if k not in metrics]
    p99 = {m for m in metrics if any(_q(r.get(m), "p99") is not None for r in rows)}
    p99 &= {m for m in metrics if m.endswith("_us")}
    checked = any("verified" in r for r in rows)
    head = ["series", "size"] + [
        m + (" (median, p10-p90; p99)" if m in p99 else "") for m in metrics
    ]
    head = [h if "(" in h or not any(isinstance(r.get(h), dict) for r in rows)
            else h + " (median, p10-p90)" for h in head]  # fmt: skip
    head += ["verified"] if checked else []
    out = []
    for r in rows:
        label = str(r.get("series") or r.get("op") or r.get("path") or "")
        if r.get("baseline"):
            label += " (baseline)"
        cells = [label, size_str(r.get("size_bytes"))]
        for m in metrics:
            v = r.get(m)
            c = fmt(med(v), 2)
            if _q(v, "p10") is not None:
                c += f" ({fmt(_q(v, 'p10'), 2)}-{fmt(_q(v, 'p90'), 2)}"
                c += f"; {fmt(_q(v, 'p99'), 2)})" if m in p99 else ")"
            cells.append(c)
        if checked:
            cells.append("" if "verified" not in r else "yes" if r["verified"] else "**no**")
        out.append(cells)
    return table(head, out)


def _targets_table(targets: List[Dict[str, Any]]) -> str:
    out = []
    for t in targets:
        met = t.get("met")
        m = t.get("measured")
        out.append([
            str(t.get("target", "")),
            f"{t.get('sense', '')} {fmt(t.get('bound'), 2)}",
            fmt(m, 3 if isinstance(m, (int, float)) and abs(m) < 10 else 1),
            "met" if met else "**not met**" if met is False else "not measured",
        ])  # fmt: skip
    return table(["target", "bound", "measured", "result"], out)


def generic_table(name: str, d: Dict[str, Any]) -> str:
    """Rows grouped by their ``table`` key (else all together), one table per group; then the
    baselines; then ``targets`` (``[{"target", "sense", "bound", "measured", "met"}]``)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in d.get("rows") or []:
        groups.setdefault(str(r.get("table") or ""), []).append(r)
    base = [dict(b, baseline=True) for b in d.get("baselines") or []]
    if base and list(groups) == [""]:
        groups[""] += base
    elif base:
        groups["baselines"] = base
    parts = [header(name, d)]
    for title, rows in groups.items():
        parts += ["", f"**{title}**", ""] if title else [""]
        parts.append(_generic_rows(rows))
    if d.get("targets"):
        parts += ["", "**targets**", "", _targets_table(d["targets"])]
    return "\n".join(parts)


TABLES: Dict[str, Callable[[str, Dict[str, Any]], str]] = {
    "moe": moe_table,
    "gpu": gpu_table,
    "kvcache": kvcache_table,
    "weights": weights_table,
    "weights_plan": weights_plan_table,
    "gpu_check": gpu_check_table,
}


def render(name: str, d: Dict[str, Any]) -> str:
    """The markdown table (with its data line) of file ``name`` with contents ``d``."""
    fam = family(name, d)
    if fam == "moe" and "configs" not in d:
        return header(name, d) + "\n\n(raw data only: a sweep or experiment file; see its notes)"
    return TABLES.get(fam, generic_table)(name, d)


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _short(name: str) -> str:
    return re.sub(r"\.json$", "", name)


def plot_gpu(ax_list, files):
    (ax,) = ax_list
    for name, d in files:
        bw = [r for r in d.get("rows", []) if r.get("op") == "nvlink_write"]
        if not bw:
            continue
        xs = [r["size_bytes"] for r in bw]
        ax.plot(xs, [r["gb_per_s"] for r in bw], "o-", label=f"stolon NVLink ({_short(name)})")
        for key, lab in (("peer_copy_gb_per_s", "peer copy, copy + sync"),
                         ("peer_copy_batched_gb_per_s", "peer copy, events around a batch"),
                         ("peer_copy_graph_gb_per_s", "peer copy, CUDA graph")):  # fmt: skip
            pts = [(r["size_bytes"], r[key]) for r in bw if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), "x--", label=f"{lab} ({_short(name)})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("write size, bytes")
    ax.set_ylabel("GB/s")
    ax.set_title("NVLink writes between two processes vs peer copy (same run)")


def plot_moe(ax_list, files):
    forms = (("stolon", "", "stolon send + recv", "o-"),
             ("stolon", "_whole", "stolon one span", "s-"),
             ("stolon", "_overlapped", "stolon overlapped", "^-"),
             ("nccl_graph", "", "NCCL graph padded (unweighted)", "x--"),
             ("nccl_graph_weighted", "", "NCCL graph weighted", "d--"),
             ("nccl_eager", "", "NCCL eager", "+:"))  # fmt: skip
    for ax, what in zip(ax_list, ("dispatch", "combine")):
        for name, d in files:
            cfgs = d.get("configs") or {}
            order = sorted(cfgs, key=lambda n: cfgs[n].get("config", {}).get("tokens", 0))
            toks = [cfgs[n].get("config", {}).get("tokens") for n in order]
            tag = f"{d.get('world', '?')} GPU, {_short(name)[-14:]}"
            for form, suffix, lab, style in forms:
                pts = [
                    (t, med((cfgs[n].get(form) or {}).get(what + suffix)))
                    for t, n in zip(toks, order)
                ]
                pts = [(t, v) for t, v in pts if v is not None and t]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{lab} [{tag}]")
            pts = [(t, (cfgs[n].get("floor_us") or {}).get(what)) for t, n in zip(toks, order)]
            pts = [(t, v) for t, v in pts if v]
            if pts:
                ax.plot(*zip(*pts), "k:", label=f"NVLink floor [{tag}]")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("us (median)")
        ax.set_title(f"MoE {what}")


def plot_kvcache(ax_list, files):
    (ax,) = ax_list
    labels, series = [], {}
    keys = (("extra_after_prefill_s", "transfer after prefill"),
            ("extra_streaming_s", "streaming: extra after prefill"),
            ("one_layer_transfer_s", "one layer, paged path"),
            ("link_layer_s", "one layer at peer-copy rate"))  # fmt: skip
    for name, d in files:
        for r in d.get("rows", []):
            labels.append(f"{r.get('path')}\n{_short(name)[-20:]}")
            for k, lab in keys:
                series.setdefault(lab, []).append((r.get(k) or 0) * 1e3)
    n = len(labels)
    w = 0.8 / max(1, len(series))
    for i, (lab, vals) in enumerate(series.items()):
        ax.bar([j + i * w for j in range(n)], vals, w, label=lab)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(n)])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("KV-cache streaming: time after prefill vs one layer's transfer")


def plot_weights(ax_list, files):
    (ax,) = ax_list
    labels, series = [], {}
    for name, d in files:
        for r in d.get("rows", []):
            labels.append(f"{r.get('path')} {r.get('layout')} {r.get('train')}->{r.get('infer')}"
                          f"\n{_short(name)[8:30]}")  # fmt: skip
            ib = r.get("recv_bytes_per_infer_gpu") or 0
            for k, lab in (("update_s", "stolon"), ("baseline_update_s", "NCCL gather + broadcast"),
                           ("baseline_shards_update_s", "NCCL shards only")):  # fmt: skip
                v = r.get(k)
                series.setdefault(lab, []).append(ib / v / 1e9 if v else 0)
            series.setdefault("peer-copy ceiling", []).append(
                (d.get("ceilings") or {}).get("peer_copy_gb_per_s") or 0
            )
    n = len(labels)
    w = 0.8 / max(1, len(series))
    for i, (lab, vals) in enumerate(series.items()):
        ax.bar([j + i * w for j in range(n)], vals, w, label=lab)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(n)])
    ax.set_xticklabels(labels, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("GB/s per inference GPU")
    ax.set_title("Weight update: stolon vs NCCL baselines (same run)")


def plot_generic(ax_list, files):
    (ax,) = ax_list
    metric = None
    for _, d in files:
        for r in list(d.get("rows") or []) + list(d.get("baselines") or []):
            metric = metric or next((m for m in PLOT_METRICS if med(r.get(m)) is not None), None)
    if metric is None:
        return
    for name, d in files:
        groups: Dict[str, List[Tuple[float, float, float, float]]] = {}
        for r in d.get("rows") or []:
            v = r.get(metric)
            if med(v) is None or r.get("size_bytes") is None:
                continue
            lo, hi = _q(v, "p10"), _q(v, "p90")
            m = med(v)
            key = str(r.get("series") or r.get("op") or r.get("path") or "")
            groups.setdefault(key, []).append((r["size_bytes"], m, lo if lo is not None else m,
                                               hi if hi is not None else m))  # fmt: skip
        for key, pts in groups.items():
            pts.sort()
            xs, ys, los, his = zip(*pts)
            ax.errorbar(xs, ys, yerr=[[y - lo for y, lo in zip(ys, los)],
                                      [hi - y for y, hi in zip(ys, his)]],
                        fmt="o-", capsize=2, label=f"{key} ({_short(name)})")  # fmt: skip
        sized: Dict[str, List[Tuple[float, float]]] = {}
        for b in d.get("baselines") or []:
            v = med(b.get(metric))
            if v is None:
                continue
            lab = f"{b.get('series', 'baseline')} (baseline)"
            if b.get("size_bytes") is not None:
                sized.setdefault(lab, []).append((b["size_bytes"], v))
            else:
                ax.axhline(v, linestyle="--", color="gray", label=lab)
        for lab, pts in sized.items():
            ax.plot(*zip(*sorted(pts)), "k*--", label=lab)
    ax.set_xscale("log", base=2)
    vals = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if vals and max(vals) / min(vals) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("size, bytes")
    ax.set_ylabel(metric.replace("_", " "))


PLOTS = {"gpu": (plot_gpu, 1), "moe": (plot_moe, 2), "kvcache": (plot_kvcache, 1),
         "weights": (plot_weights, 1)}  # fmt: skip


def plot_family(fam: str, files: List[Tuple[str, Dict[str, Any]]], out: Path) -> bool:
    """Draws ``out`` (a PNG) for family ``fam`` from ``files``; False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fn, n = PLOTS.get(fam, (plot_generic, 1))
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 5), squeeze=False)
    fn(list(axes[0]), files)
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"{fam}: " + ", ".join(_short(n) for n, _ in files)[:160], fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
# the document
# ------------------------------------------------------------------------------------------------


def update_doc(text: str, data_dir: Path) -> Tuple[str, List[str]]:
    """``text`` with every report block regenerated; also the file names the blocks cite."""
    cited: List[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        cited.append(name)
        p = data_dir / name
        body = render(name, load(p)) if p.exists() else f"**missing: docs/data/{name}**"
        return f"{m.group(1)}{body}\n{m.group(4)}"

    return BLOCK.sub(sub, text), cited


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO / "docs" / "data"))
    ap.add_argument("--plots", default=str(REPO / "docs" / "plots"))
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the doc's tables are stale")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--print", metavar="FILE", help="print one data file's table and exit")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if args.print:
        p = Path(args.print)
        p = p if p.exists() else data / args.print
        print(render(p.name, load(p)))
        return 0
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else ""
    new, cited = update_doc(text, data)
    if args.check:
        if new != text:
            print(f"{doc}: tables out of date; run benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        doc.write_text(new)
        print(f"updated {len(cited)} tables in {doc}")
    if args.no_plots:
        return 0
    by_fam: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {}
    cited_fam: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {}
    for p in sorted(data.glob("*.json")):
        d = load(p)
        fam = family(p.name, d)
        if fam == "moe" and "configs" not in d:
            continue
        by_fam.setdefault(fam, []).append((p.name, d))
        if p.name in cited:
            cited_fam.setdefault(fam, []).append((p.name, d))
    for fam in FAMILIES:
        files = cited_fam.get(fam) or by_fam.get(fam)
        if not files:
            print(f"{fam}: no data in {data}, no plot")
            continue
        out = Path(args.plots) / f"{fam}.png"
        if not plot_family(fam, files, out):
            print("matplotlib is not installed: plots skipped (pip install matplotlib)")
            break
        print(f"wrote {out} from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
