"""benchmarks/bench_short_threads.py: both thread policies timed on the three decode cases; the switch restored."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_short_threads.py"


def test_short_threads_bench_times_each_case_both_ways_and_restores_the_switch(capsys):
    spec = importlib.util.spec_from_file_location("bench_short_threads_under_test", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = os.environ.get("NAPARI_MEDSAM_ADAPTIVE_THREADS")
    assert bench.main(["--model", "lite_medsam", "--compete", "0", "--pairs", "1"]) == 0
    assert os.environ.get("NAPARI_MEDSAM_ADAPTIVE_THREADS") == before
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |")]
    assert len(rows) == 6
    for case in ("prepared slice", "slice not prepared", "box + previous mask"):
        assert {r.split(" | ")[2] for r in rows if f"| {case} |" in r} == {"full count", "short_work_threads"}
    assert all(float(r.split(" | ")[3]) > 0 for r in rows)
