"""``examples/train_longnet.py`` on the standard library's source: the loss falls, a killed
run resumes exactly, and the ring run (2 gloo processes) matches one process."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_longnet  # noqa: E402

sys.path.remove(str(ROOT / "examples"))

# A small model on 256-byte windows: LongNet branches w = 64, 128, 256 with r = 1, 2, 4.
SMALL = ["--cpu", "--seq-len", "256", "--base-segment", "64", "--batch-size", "4",
         "--embed-dim", "32", "--num-heads", "4", "--num-layers", "2", "--eval-windows", "2",
         "--no-plot"]  # fmt: skip


def _run(out: pathlib.Path, *extra: str) -> dict:
    return train_longnet.train(train_longnet.parse_args([*SMALL, "--out", str(out), *extra]))


def _log(out: pathlib.Path) -> list[dict]:
    return train_longnet.read_log(out / "log.jsonl")


def test_corpus_split_is_deterministic_and_by_file() -> None:
    a = train_longnet.load_corpus(None)
    b = train_longnet.load_corpus(None)
    assert torch.equal(a.train, b.train) and torch.equal(a.validation, b.validation)
    assert a.files[0] > 10 * a.files[1] > 0  # one file in 20 is validation
    x, y = train_longnet.training_batch(a.train, 3, 0, 2, 16, seed=0)
    assert x.shape == y.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = train_longnet.training_batch(a.train, 3, 0, 2, 16, seed=0)
    x3, _ = train_longnet.training_batch(a.train, 3, 1, 2, 16, seed=0)
    assert torch.equal(x, x2) and not torch.equal(x, x3)  # data-parallel ranks differ
    assert train_longnet.branches(1024, 128) == ([128, 256, 512, 1024], [1, 2, 4, 8])
    assert train_longnet.branches(100, 128) == ([100], [1])


def test_loss_falls_on_the_standard_library(tmp_path: pathlib.Path) -> None:
    summary = _run(tmp_path, "--steps", "40", "--lr", "3e-3", "--warmup", "5",
                   "--eval-every", "40")  # fmt: skip
    losses = [r["loss"] for r in _log(tmp_path) if "loss" in r]
    assert len(losses) == 40
    # Uniform guessing over bytes costs log(256) = 5.55 nats; 40 steps of a tiny model
    # learn the byte statistics of Python source (about 3.6 nats).
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    assert summary["val_bpb"] < 6.0  # bits per byte on held-out files (uniform: 8)


def test_a_killed_run_resumes_where_it_stopped(tmp_path: pathlib.Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # Dropout makes every step draw random numbers: resuming must restore them too.
    args = ("--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--dropout", "0.1")
    done = _run(whole, *args, "--sample", "8")
    # Killed after step 3: the checkpoint is step 2's and the log already has step 3.
    assert _run(parts, *args, "--stop-at", "3") == {"stopped_at": 3}
    assert [r["step"] for r in _log(parts) if "loss" in r] == [1, 2, 3]
    summary = _run(parts, *args)  # the same command again: continues after step 2
    a, b = _log(whole), _log(parts)
    assert [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4]  # step 3 logged once
    for key in ("loss", "val_bpb"):
        assert [r[key] for r in a if key in r] == [r[key] for r in b if key in r], key
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 256
    assert summary["val_bpb"] == done["val_bpb"]
    written = json.loads((parts / "summary.json").read_text())
    assert written["val_bpb"] == summary["val_bpb"] and written["config"]["seq_len"] == 256
    # Running a finished run again trains nothing and keeps its summary.
    assert _run(parts, *args) == written
    assert json.loads((parts / "summary.json").read_text()) == written
    # Another model or another data stream in the same folder is refused, not mixed in.
    for other in (("--embed-dim", "64"), ("--seed", "1")):
        with pytest.raises(SystemExit, match="was written for another configuration"):
            _run(parts, *args, "--steps", "6", *other)


def test_script_writes_its_picture(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    args = [a for a in SMALL if a != "--no-plot"]
    train_longnet.train(train_longnet.parse_args([*args, "--out", str(tmp_path), "--steps", "2",
                                                  "--eval-every", "1"]))  # fmt: skip
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.distributed
def test_ring_run_on_two_processes_matches_one(tmp_path: pathlib.Path) -> None:
    single, ring = tmp_path / "single", tmp_path / "ring"
    args = [*SMALL, "--steps", "3", "--eval-every", "3"]
    subprocess.run([sys.executable, "examples/train_longnet.py", *args, "--out", str(single)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "examples/train_longnet.py", *args, "--sp", "2", "--out", str(ring)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    summary = json.loads((ring / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["sp"] == 2
    a, b = _log(single), _log(ring)
    # The same data and weights; the ring merges blocks in another order (float32).
    for key in ("loss", "val_bpb"):
        x, y = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
        assert len(x) == len(y) > 0
        assert all(abs(p - q) < 1e-4 for p, q in zip(x, y)), (key, x, y)
