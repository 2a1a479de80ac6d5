"""``python benchmarks/demo.py`` runs, prints one row per sequence length and writes its JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAMP_FIELDS = {
    "device",
    "date",
    "python",
    "torch",
    "triton",
    "cuda",
    "gpu_count",
    "command",
    "git_commit",
}


def test_demo_prints_rows_and_writes_json(tmp_path: Path) -> None:
    args = ["--device", "cpu", "--max-seq-len", "2048", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "benchmarks/demo.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "layer: MultiheadDilatedAttention(embed_dim=64, num_heads=4)" in out
    rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d+) s .*?(\d+\.\d+) s .*?(\d+ MiB)\s*$", out, re.M)
    assert [int(r[0]) for r in rows] == [1024, 2048], out

    (path,) = tmp_path.glob("demo_cpu_*.json")
    assert f"wrote {path}" in out
    report = json.loads(path.read_text())
    assert STAMP_FIELDS <= report.keys()
    assert report["command"] == "python benchmarks/demo.py " + " ".join(args)
    assert report["device_type"] == "cpu" and report["gpu_count"] == 0
    assert [r["N"] for r in report["rows"]] == [1024, 2048]
    for row in report["rows"]:
        assert row["dilated_seconds"] > 0 and row["dense_seconds"] > 0
        assert row["dilated_error"] is None and row["dense_skipped"] is None
        assert {"dilated_peak_bytes", "dense_peak_bytes", "scores_bytes"} <= row.keys()
    assert report["backend"] == "pytorch" and report["backend_choice"].startswith("pytorch")
    assert f"backend: backend='auto' runs {report['backend_choice']}" in out
    assert report["summary"] and report["summary"][0] in out


def _row(n: int, dilated: float, dense: float | None, dil_mem: int = 2, den_mem: int = 1) -> dict:
    return {
        "N": n,
        "dilated_seconds": dilated,
        "dense_seconds": dense,
        "dilated_peak_bytes": dil_mem,
        "dense_peak_bytes": None if dense is None else den_mem,
    }


def _summarize():
    from conftest import import_benchmark

    return import_benchmark("demo").summarize


def test_summary_names_the_crossover_and_the_memory_ratio() -> None:
    summarize = _summarize()
    lines = summarize([_row(1024, 0.4, 0.1), _row(2048, 0.8, 0.4), _row(4096, 1.6, 3.2, 6, 3),
                       _row(8192, 3.2, None)])  # fmt: skip
    assert lines[0].startswith(
        "time: dilated is faster than dense from N = 4096 on (2.0x at N = 4096"
    )
    assert "dense was not run from N = 8192 on" in lines[1]
    assert lines[2].startswith("memory: dilated used 2.0x dense's peak")
    assert lines[-1].startswith("choice:")


def test_summary_extrapolates_a_crossover_it_did_not_reach() -> None:
    # dilated 1e-4 s per token, dense 1e-8 s per token^2 at N = 2048: they cross at 10,000.
    lines = _summarize()([_row(2048, 1e-4 * 2048, 1e-8 * 2048**2)])
    assert "dense was faster at every N it ran" in lines[0]
    assert "cross near N = 10,000." in lines[0]


def test_summary_does_not_claim_a_crossover_that_reverses() -> None:
    lines = _summarize()([_row(1024, 0.1, 0.2), _row(2048, 0.4, 0.3)])
    assert lines[0] == (
        "time: dilated was faster at N = 1024, but not at N = 2048, the largest N dense ran."
    )
