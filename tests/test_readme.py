"""Every Python block of the README runs as written.

Blocks that start a process group run under ``torchrun`` with two gloo processes;
the others run in a fresh interpreter each.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path: pathlib.Path) -> None:
    code = BLOCKS[index]
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code)
    if "init_process_group" in code:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, f"README block {index} failed:\n{code}\n{res.stderr[-4000:]}"
