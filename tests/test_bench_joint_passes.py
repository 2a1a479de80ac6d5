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
    assert bench.JOINT_PASSES["joint_unpacked"] == {"forward", "dq", "dkdv"}
    assert bench.JOINT_PASSES["joint_fwd_dq"] == {"forward", "dq"}
    assert bench.JOINT_PASSES["per_branch"] == set()
    for way, settings in bench.WAYS.items():
        for name, value in settings.items():
            monkeypatch.setattr(launch, name, value)
        assert bench.joint_passes(D, 16, 1 << 20) == bench.JOINT_PASSES[way], way
        assert bench.default_way(D) == way


def test_joint_ways_differ_in_how_the_row_terms_are_read(bench, monkeypatch) -> None:
    # joint and joint_unpacked run the same passes; the dK/dV pass reads the row terms
    # packed in one and as separate values in the other (what _joint_dkdv is given).
    import torch

    from dilated_attention_pytorch.backends.triton import launch

    seen = []
    monkeypatch.setattr(launch, "_joint_dkdv", lambda *a, **kw: seen.append(a[4].stride(0)))
    monkeypatch.setattr(launch, "_joint_dq", lambda *a, **kw: None)
    plan = bench.make_plan([16, 32], [1, 2], 2)
    q, out, dout = (torch.zeros(1, 64, 2, 8) for _ in range(3))
    lse = torch.zeros(2, 1, 64, 2)
    monkeypatch.setattr(launch, "_INTERPRET_CONFIG", launch.KernelConfig(8, 8, 1, 1))
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    monkeypatch.setattr(launch, "_compute_delta", lambda d, o, into=None, lse=None: into)
    for way in ("joint", "joint_unpacked"):
        for name, value in bench.WAYS[way].items():
            monkeypatch.setattr(launch, name, value)
        launch.dilated_backward(dout, q, q, q, out, lse, plan, scale=1.0)
    # packed: lo one element after hi; unpacked: the planes whole tensors apart.
    assert seen == [1, 64 * 2]


def test_default_way_follows_the_library_settings(bench, monkeypatch) -> None:
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setattr(launch, "BRANCH_MODE", "joint")
    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", None)
    assert bench.default_way(128) == "joint"
    monkeypatch.setattr(launch, "PACKED_ROW_TERMS", False)
    assert bench.default_way(128) == "joint_unpacked"
    monkeypatch.setattr(launch, "PACKED_ROW_TERMS", True)
    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", 64)
    assert (bench.default_way(64), bench.default_way(128)) == ("joint", "joint_fwd_dq")
