"""benchmarks/report.py: tables rewritten in place from JSON fixtures, and a plot per family.

CPU only. The plot assertions need matplotlib (a dev dependency: `pip install matplotlib`);
without it they are skipped with that reason, the table checks still run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import benchmeta  # noqa: E402
import report  # noqa: E402


def _moe_fixture() -> dict:
    def st(m: float) -> dict:
        return {"median_us": m, "p99_us": m + 1, "p10_us": m - 1, "p90_us": m + 0.5, "n": 10}

    cfg = lambda t: {"tokens": t, "hidden": 7168, "experts": 256, "topk": 8}  # noqa: E731
    return {
        "meta": benchmeta.meta(),
        "world": 2,
        "peer_copy_gbps": 380.0,
        "configs": {
            "prefill": {
                "config": cfg(4096),
                "stolon": {"dispatch": st(230.0), "dispatch_whole": st(228.0),
                           "dispatch_overlapped": st(150.0), "combine": st(314.0)},
                "nccl_graph_weighted": {"dispatch": st(290.0), "combine": st(400.0)},
                "floor_us": {"dispatch": 78.0, "combine": 151.0},
                "check": {"forms": {"split": {"ok": True}, "overlapped": {"ok": True}}},
            },
            "decode": {
                "config": cfg(128),
                "stolon": {"dispatch": st(32.0), "dispatch_whole": st(28.5), "combine": st(32.0)},
                "nccl_graph": {"dispatch": st(33.8), "combine": st(61.9)},
                "floor_us": {"dispatch": 2.4, "combine": 4.7},
                "check": {"forms": {"split": {"ok": False}}},
            },
        },
    }  # fmt: skip


def _generic_fixture() -> dict:
    rows = [
        {"series": "tcp single", "size_bytes": s, "gbit_per_s": benchmeta.spread([g, g + 1, g + 2])}
        for s, g in ((65536, 20.0), (1 << 20, 40.0), (16 << 20, 38.0))
    ]
    return {
        "meta": dict(benchmeta.meta(), benchmark="bench_engine.py"),
        "rows": rows,
        "baselines": [{"series": "iperf3", "gbit_per_s": 20.2}],
    }


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "moe_fixture.json").write_text(json.dumps(_moe_fixture()))
    (d / "engine_fixture.json").write_text(json.dumps(_generic_fixture()))
    return d


def test_spread_percentiles() -> None:
    s = benchmeta.spread(range(1, 101))
    assert s["n"] == 100 and s["median"] == 50.5 and s["min"] == 1 and s["max"] == 100
    assert (s["p10"], s["p90"], s["p99"]) == (11, 91, 100)
    assert benchmeta.spread([]) == {"n": 0}


def test_meta_has_command_machine_date_commit() -> None:
    m = benchmeta.meta({"extra": 1})
    assert m["schema"] == benchmeta.SCHEMA and m["extra"] == 1
    assert m["date_utc"].endswith("Z") and "command" in m and "commit" in m["git"]
    assert m["machine"]["cpu_count"] and "gpus" in m["machine"]


def test_doc_blocks_are_regenerated(data: Path, tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text(
        "# title\nkept text\n<!-- report moe_fixture.json -->\nold\n<!-- /report -->\n"
        "middle\n<!-- report engine_fixture.json -->\n<!-- /report -->\nend\n"
    )
    args = ["--data", str(data), "--doc", str(doc), "--no-plots"]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0
    text = doc.read_text()
    assert report.main(args + ["--check"]) == 0
    assert (
        text.startswith("# title\nkept text\n") and "\nmiddle\n" in text and text.endswith("end\n")
    )
    assert "old" not in text
    lines = text.splitlines()
    # columns ordered by tokens; the measure and the one-span call side by side
    assert "| us, median / p99 | decode (128 tok) | prefill (4096 tok) |" in lines
    assert (
        "| stolon dispatch_send + dispatch_recv (issue's measure) | 32.0 / 33.0 | 230.0 / 231.0 |"
        in lines
    )
    assert "| stolon dispatch(), one span | 28.5 / 29.5 | 228.0 / 229.0 |" in lines
    assert "| NCCL graph, top-k weighted index_add_: combine |  | 400.0 / 401.0 |" in lines
    target = next(x for x in lines if x.startswith("| dispatch: against target"))
    assert "target 30: send+recv 32.0 **not met**; one span 28.5" in target
    assert "best 1.92x" in target and "(target 2x: met)" in target
    check = next(x for x in lines if x.startswith("| outputs checked"))
    assert "**failed**: split" in check and "ok (split, overlapped)" in check
    # the generic layout: series, size, median with p10-p90, and the baseline row
    assert "| tcp single | 64 KiB | 21.00 (20.00-22.00) |" in lines
    assert "| iperf3 (baseline) |  | 20.20 |" in lines
    assert "Data: `docs/data/moe_fixture.json`." in text


def test_plots_written(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    plots = tmp_path / "plots"
    doc = tmp_path / "none.md"
    assert report.main(["--data", str(data), "--doc", str(doc), "--plots", str(plots)]) == 0
    for fam in ("moe", "engine"):
        png = plots / f"{fam}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fam
