"""``benchmarks/bench_joint_passes.py``: each way it times runs the passes its name says
(checked on the launcher's decisions, without a GPU; the timing itself needs CUDA)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")


@pytest.fixture
def bench():
    from conftest import import_benchmark

    return import_benchmark("bench_joint_passes")


@pytest.mark.parametrize("D", [64, 128])
def test_ways_run_the_passes_they_name(bench, monkeypatch, D) -> None:
    from dilated_attention_pytorch.backends.triton import launch

    assert set(bench.WAYS) == set(bench.JOINT_PASSES)
    assert bench.JOINT_PASSES["joint"] == {"forward", "dq", "dkdv"}
    assert bench.JOINT_PASSES["joint_fwd_dq"] == {"forward", "dq"}
    assert bench.JOINT_PASSES["per_branch"] == set()
    for way, (mode, cap) in bench.WAYS.items():
        monkeypatch.setattr(launch, "BRANCH_MODE", mode)
        monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", cap)
        assert bench.joint_passes(D, 16, 1 << 20) == bench.JOINT_PASSES[way], way
        assert bench.default_way(D) == way


def test_default_way_follows_the_library_settings(bench, monkeypatch) -> None:
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setattr(launch, "BRANCH_MODE", "joint")
    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", None)
    assert bench.default_way(128) == "joint"
    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", 64)
    assert (bench.default_way(64), bench.default_way(128)) == ("joint", "joint_fwd_dq")
