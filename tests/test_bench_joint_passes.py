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
    from dilated_attention_pytorch.plan import make_plan

    H, N = 16, 1 << 20
    sched = launch._schedule(make_plan(bench.SEGMENTS, bench.RATES, H))
    expected = {
        "joint": {"forward", "dq", "dkdv"},
        "joint_fwd_dq": {"forward", "dq"},
        "per_branch": set(),
    }
    assert set(bench.WAYS) == set(expected)
    for way, (mode, cap) in bench.WAYS.items():
        monkeypatch.setattr(launch, "BRANCH_MODE", mode)
        monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", cap)
        joint = {
            p
            for p in ("forward", "dq", "dkdv")
            if launch._joint_pass(p, sched, H, N, D, 1, causal=False, documents=None)
        }
        assert joint == expected[way], way
        assert bench.default_way(D) == way


def test_default_way_follows_the_library_settings(bench, monkeypatch) -> None:
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setattr(launch, "BRANCH_MODE", "joint")
    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", None)
    assert bench.default_way(128) == "joint"
    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", 64)
    assert (bench.default_way(64), bench.default_way(128)) == ("joint", "joint_fwd_dq")
