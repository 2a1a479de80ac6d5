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
