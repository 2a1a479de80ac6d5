"""``benchmarks/bench_commits.py --tiles``: tile configs per tree, parsed and installed
without a GPU (the timing itself needs CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    from conftest import import_benchmark

    return import_benchmark("bench_commits")


def test_parse_tiles(bench) -> None:
    tiles = bench.parse_tiles(
        ["dq64:dq:64=64,64,4,3", "dq64:fwd:128=64,64,4,3,168", "b:dkdv:64=32,128,4,3"],
        ["now", "dq64", "b"],
    )
    assert tiles == {
        "dq64": [["dq", 64, [64, 64, 4, 3]], ["fwd", 128, [64, 64, 4, 3, 168]]],
        "b": [["dkdv", 64, [32, 128, 4, 3]]],
    }
    assert bench.parse_tiles([], ["now"]) == {}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("dq64:dq:64", "NAME:KERNEL:D=BM,BN,WARPS,STAGES"),
        ("dq64:dq:64=64,64,four,3", "NAME:KERNEL:D=BM,BN,WARPS,STAGES"),
        ("other:dq:64=64,64,4,3", "no tree named 'other'"),
        ("dq64:bwd:64=64,64,4,3", "kernel 'bwd' is not one of"),
        ("dq64:dq:64=64,64,4", "4 or 5 positive ints"),
        ("dq64:dq:64=64,64,0,3", "4 or 5 positive ints"),
    ],
)
def test_parse_tiles_errors(bench, spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bench.parse_tiles([spec], ["now", "dq64"])


def test_apply_tiles(bench, monkeypatch) -> None:
    pytest.importorskip("triton")
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setattr(launch, "DQ_CONFIGS", dict(launch.DQ_CONFIGS))
    monkeypatch.setattr(launch, "FWD_CONFIGS", dict(launch.FWD_CONFIGS))
    bench.apply_tiles(launch, [["dq", 64, [32, 32, 2, 2]], ["fwd", 128, [64, 32, 4, 3, 168]]])
    assert launch.DQ_CONFIGS[64] == launch.KernelConfig(32, 32, 2, 2)
    assert launch.FWD_CONFIGS[128] == launch.KernelConfig(64, 32, 4, 3, 168)
    with pytest.raises(ValueError, match="has no head dim 48"):
        bench.apply_tiles(launch, [["dq", 48, [32, 32, 2, 2]]])


def test_command_line_rejects_bad_tiles(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_commits.py"), "--out", str(tmp_path),
         "--trees", f"now={ROOT}", "--tiles", "then:dq:64=64,64,4,3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "no tree named 'then'" in res.stderr
