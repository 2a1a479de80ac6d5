"""Every Python block of the README and of ``docs/`` runs as written.

Blocks that start a process group run under ``torchrun`` with two gloo processes;
the others run in a fresh interpreter each.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (doc.relative_to(ROOT), code)
    for doc in DOCUMENTS
    for code in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
]


def test_readme_and_docs_have_python_blocks() -> None:
    assert sum(doc.name == "README.md" for doc, _ in BLOCKS) >= 4
    assert {"computation.md", "ring.md"} <= {doc.name for doc, _ in BLOCKS}


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"{BLOCKS[i][0]}-{i}")
def test_readme_block_runs(index: int, tmp_path: pathlib.Path) -> None:
    doc, code = BLOCKS[index]
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code)
    if "init_process_group" in code:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, f"{doc} block {index} failed:\n{code}\n{res.stderr[-4000:]}"
