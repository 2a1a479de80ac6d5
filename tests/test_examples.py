"""The ring examples run as the README shows them (small sizes, gloo, two processes)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.distributed

EXAMPLES = {
    "ring_family": (["examples/ring_family.py", "--cpu", "--tokens", "1024"], "all OK"),
    "hilbert_image": (
        ["examples/hilbert_image.py", "--cpu", "--grid", "32", "--patch", "4"],
        "-> OK",
    ),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_on_gloo(name: str, tmp_path: pathlib.Path) -> None:
    args, expected = EXAMPLES[name]
    if name == "hilbert_image":
        pytest.importorskip("matplotlib")
        args = [*args, "--out", str(tmp_path / "hilbert_image.png")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert expected in res.stdout
    if name == "hilbert_image":
        assert (tmp_path / "hilbert_image.png").stat().st_size > 0
