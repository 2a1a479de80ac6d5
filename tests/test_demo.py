"""``python -m dilated_attention_pytorch`` runs and prints one row per sequence length."""

from __future__ import annotations

import re

import pytest

from dilated_attention_pytorch.__main__ import main


def test_demo_prints_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cpu", "--max-seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "layer: MultiheadDilatedAttention(embed_dim=64, num_heads=4)" in out
    rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d+) s .*?(\d+\.\d+) s .*?(\d+ MiB)\s*$", out, re.M)
    assert [int(r[0]) for r in rows] == [1024, 2048], out
