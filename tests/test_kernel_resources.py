"""The Triton kernels' GPU-only forms compile for a Hopper GPU (sm_90) on any machine.

``benchmarks/kernel_resources.py`` records the launches a real call makes (the launchers
run on ``meta`` tensors with the kernels replaced by recorders) and compiles them with
Triton's compiler and its bundled ``ptxas``, as Triton's runtime would on an H100/H200.
Here: the backward's launches for each ``DQ_MODE``, and the ``"tma"`` form of the dK/dV
kernel (a tensor-descriptor bulk reduce-add, which the CPU interpreter cannot run) compiles
into PTX holding that instruction, within the shared memory of one block. Skipped without
Triton or its ``ptxas``, and in the interpreter step (it selects the interpreter's tiles).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiles the GPU tiles, not the interpreter's",
)

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SM90_SHARED_PER_BLOCK = 232448  # bytes: 227 KiB, the most one block may use on sm_90


@pytest.fixture
def kr():
    from conftest import import_benchmark

    return import_benchmark("kernel_resources")


@pytest.mark.parametrize("causal", [False, True])
def test_launches_per_dq_mode(kr, causal) -> None:
    # LongNet's 5 branches: "separate" launches a dQ kernel and a dK/dV kernel per
    # branch (where not causal one joint dQ launch and one joint dK/dV launch for all of
    # them); "atomic" and "tma" no dQ kernel, their per-branch dK/dV launches adding dQ
    # (DQ_ADD 1 and 2 as on a GPU of capability 9.0). The forward is one joint launch
    # where not causal, one launch per branch where causal.
    data_ptr = torch.Tensor.data_ptr
    with kr.as_on_gpu():
        runs = {
            mode: kr.launches(1 << 16, 64, causal, mode) for mode in ("separate", "atomic", "tma")
        }
    assert torch.Tensor.data_ptr is data_ptr  # restored
    for mode, expected in (("separate", 0), ("atomic", 1), ("tma", 2)):
        names = [c[0] for c in runs[mode]]
        assert names.count("_fwd_kernel") == (5 if causal else 0)
        assert names.count("_joint_fwd_kernel") == (0 if causal else 1)
        separate = expected == 0
        joint = separate and not causal
        assert names.count("_bwd_dkdv_kernel") == (0 if joint else 5)
        assert names.count("_joint_dkdv_kernel") == (1 if joint else 0)
        assert names.count("_bwd_dq_kernel") == (5 if separate and causal else 0)
        assert names.count("_joint_dq_kernel") == (1 if separate and not causal else 0)
        # Per-branch passes through fp32 accumulators (causal, dQ in its own kernel):
        # each zeroes only the rows its first launch does not store.
        assert names.count("_zero_uncovered_kernel") == (2 if separate and causal else 0)
        dq_add = {c[3]["DQ_ADD"] for c in runs[mode] if c[0] == "_bwd_dkdv_kernel"}
        assert dq_add == (set() if joint else {expected})
        # The dK/dV kernels read packed row terms where dQ has its own kernel
        # (PACKED_ROW_TERMS, on by default), separate values where they add dQ.
        dkdv = ("_bwd_dkdv_kernel", "_joint_dkdv_kernel")
        packed = {c[3]["PACKED"] for c in runs[mode] if c[0] in dkdv}
        assert packed == {separate}


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_tma_dq_form_compiles_for_sm90(kr) -> None:
    with kr.as_on_gpu():
        calls = kr.launches(1 << 16, 64, True, "tma")
        _, fn, args, kwargs = next(c for c in calls if c[0] == "_bwd_dkdv_kernel")
        source, options = kr.specialize(fn, args, kwargs, 90)
    got = kr.compile_launch(source, options, 90)
    assert got["tma_reduce"], "the dK/dV kernel's dQ adds are not bulk tensor reduce-adds"
    assert 0 < got["registers"] <= 255
    assert got["shared_bytes"] <= SM90_SHARED_PER_BLOCK


_SASS = """
_k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS R2, [R3] ;
.L_x_1:
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
.L_x_4:
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR6], R24 ;
        /*0040*/                   MUFU.EX2 R5, R6 ;
        /*0050*/                   FFMA R7, R5, R8, R9 ;
        /*0060*/                   STL [R1], R7 ;
        /*0070*/               @P0 BRA `(.L_x_1) ;
        /*0080*/                   IADD3 R3, R3, 0x10, RZ ;
        /*0090*/               @P1 BRA `(.L_x_0) ;
.L_x_2:
        /*00a0*/                   FADD R1, R1, R1 ;
        /*00b0*/               @P2 BRA `(.L_x_2) ;
        /*00c0*/                   EXIT ;
.L_x_3:
        /*00d0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR8], R4 ;
        /*00e0*/              @!P3 BRA `(.L_x_3) ;
        /*00f0*/                   BRA `(.L_x_4) ;
"""


def test_sass_loops_counts_the_innermost_tensor_core_loop(kr) -> None:
    # Loops: the outer one holds the inner (not innermost), .L_x_2 has no MMA, and the
    # out-of-line wait at the end jumps back into the inner loop's body (the way ptxas
    # places a barrier's retry): that span overlaps the inner loop without nesting in
    # it, so it is not a loop. One loop is counted.
    (loop,) = kr.sass_loops(_SASS)
    assert loop["instructions"] == 6
    assert (loop["mma"], loop["exp"], loop["fp32"], loop["spill"]) == (2, 1, 1, 1)
    assert loop["integer_and_control"] == 1  # the branch
    assert sum(v for k, v in loop.items() if k != "instructions") == loop["instructions"]


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_joint_dkdv_loop_counted_for_sm90(kr) -> None:
    # D = 64: the joint dK/dV's query-tile loop runs four matmuls of a 32 x 128 tile per
    # step (two 64 x 32 x 16 and one 64 x 64 x 16 HGMMA per warpgroup slice each: 24),
    # one exp per score (32 per thread), and a first loop (the whole tiles) is found.
    with kr.as_on_gpu():
        calls = kr.launches(1 << 16, 64, False, "separate", "tma")
        _, fn, args, kwargs = next(c for c in calls if c[0] == "_joint_dkdv_kernel")
        source, options = kr.specialize(fn, args, kwargs, 90)
    loops = kr.compile_launch(source, options, 90, loops=True)["loops"]
    # One loop: the spans from the barrier waits' out-of-line retries back into its body
    # are not loops (they were counted as two more before).
    assert len(loops) == 1 and loops[0]["mma"] == 24 and loops[0]["exp"] == 32
    for loop in loops:
        assert sum(v for k, v in loop.items() if k != "instructions") == loop["instructions"]


def test_candidate_forms_cover_every_tune_config(kr, monkeypatch) -> None:
    # --candidates: each config bench_dilated --tune tries is launched as the launcher's
    # config (compilation stubbed here), and the tables get their defaults back.
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setattr(kr, "specialize", lambda fn, a, kw, arch: (None, None))
    stub = {"registers": 1, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0, "tma_reduce": 0}
    monkeypatch.setattr(kr, "compile_launch", lambda source, options, arch, loops=False: dict(stub))
    defaults = {name: dict(getattr(launch, name)) for name, _ in kr._TABLES.values()}
    seen: dict = {}
    with kr.as_on_gpu():
        kr.candidate_forms(1 << 16, 64, "pointer", 90, seen)
    assert {name: dict(getattr(launch, name)) for name in defaults} == defaults
    # Without causality the forward, dK/dV and dQ run jointly (one launch for all
    # branches, no CAUSAL setting), with it per branch.
    kernel_of = {
        "fwd": ("fwd", "joint_fwd"),
        "dkdv": ("bwd_dkdv", "joint_dkdv"),
        "dq": ("bwd_dq", "joint_dq"),
        "dkdv_dq": ("bwd_dkdv",),
    }
    for kernel, configs in kr.tune_candidates(64).items():
        dq_add = 2 if kernel == "dkdv_dq" else 0
        for config in configs:
            form = (*config, None) if len(config) == 4 else config  # (..., maxnreg)
            rows = [
                r for r in seen.values()
                if r["kernel"] in kernel_of[kernel] and r.get("dq_add", 0) == dq_add
                and (r["block_m"], r["block_n"], r["num_warps"], r["num_stages"], r["maxnreg"])
                == form
            ]  # fmt: skip
            assert {r.get("causal", False) for r in rows} == {False, True}, (kernel, form)
            assert all(r["candidate"] for r in rows)


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_register_cap_reaches_the_compiler(kr, monkeypatch) -> None:
    # KernelConfig.maxnreg is passed as Triton's maxnreg launch option, and the compiled
    # form keeps to it (here the causal forward merging into earlier branches, which
    # takes more than 128 registers uncapped with pointer loads); the interpreter gets none.
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setitem(launch.FWD_CONFIGS, 64, launch.KernelConfig(128, 64, 8, 3, maxnreg=128))
    with kr.as_on_gpu():
        calls = kr.launches(1 << 16, 64, True, "separate", "pointer")
        forms = [c for c in calls if c[0] == "_fwd_kernel" and c[3]["ACC_IN"]]
        assert forms and all(c[3]["maxnreg"] == 128 for c in forms)
        _, fn, args, kwargs = forms[0]
        source, options = kr.specialize(fn, args, kwargs, 90)
    assert 0 < kr.compile_launch(source, options, 90)["registers"] <= 128
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    assert launch._cap(launch.FWD_CONFIGS[64]) == {}


LONGNET = ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])


@pytest.mark.parametrize(
    ("ws", "rs", "H", "H_kv", "D", "joint"),
    [
        (*LONGNET, 16, 16, 64, {"fwd", "dq", "dkdv"}),
        (*LONGNET, 16, 16, 128, {"fwd", "dq", "dkdv"}),
        (*LONGNET, 16, 4, 64, {"fwd", "dq"}),  # grouped-query: dK/dV per branch
        # 64 positions per view: only the dQ pass's 64-row tiles fit (D=64: forward 128
        # query rows, dK/dV 128 key rows); at D=128 every pass's do.
        ([512, 4096], [1, 8], 8, 8, 64, {"dq"}),
        ([512, 4096], [1, 8], 8, 8, 128, {"fwd", "dq", "dkdv"}),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cap", [None, 64, 0])
def test_memory_estimate_knows_which_passes_run_jointly(
    kr, monkeypatch, ws, rs, H, H_kv, D, joint, causal, cap
) -> None:
    # get_memory_estimate counts no accumulator for a pass the joint kernels run
    # (memory._triton_extra): its decision is the launcher's, pass by pass; causal calls
    # (is_causal=True) run every pass per branch, and JOINT_DKDV_MAX_HEAD_DIM (cap)
    # sends the dK/dV of larger head dims per branch.
    from dilated_attention_pytorch import memory
    from dilated_attention_pytorch.backends.triton import launch
    from dilated_attention_pytorch.plan import make_plan

    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", cap)
    if cap is not None and D > cap:
        joint = joint - {"dkdv"}
    N = 1 << 16
    plan = make_plan(ws, rs, H)
    q, dout = (torch.empty(1, N, H, D, device="meta", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.empty(1, N, H_kv, D, device="meta", dtype=torch.bfloat16) for _ in range(2))
    calls: list = []
    with kr.recording(calls):
        out, lse = launch.dilated_forward(q, k, v, plan, scale=D**-0.5, causal=causal)
        launch.dilated_backward(dout, q, k, v, out, lse, plan, scale=D**-0.5, causal=causal)
    joint = set() if causal else joint
    launched = {c[0].removeprefix("_joint_").removesuffix("_kernel") for c in calls}
    assert launched & {"fwd", "dq", "dkdv"} == joint
    extra = memory._triton_extra(plan, 1, N, H, D, H // H_kv, causal)
    names = {"fwd": "forward", "dq": "dq", "dkdv": "dkdv"}
    assert {p for p, name in names.items() if extra[f"triton_joint_{name}"]} == joint


@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("packed", [True, False])
def test_memory_estimate_follows_the_dq_mode_and_packing(kr, monkeypatch, dq_mode, packed):
    # With DQ_MODE adding dQ from the dK/dV kernel, the backward runs per branch and reads
    # the row terms unpacked whatever PACKED_ROW_TERMS says; the estimate's decisions
    # (memory._triton_extra) are the launcher's: the joint launches it records and the
    # row terms _launch_backward is told are packed.
    from dilated_attention_pytorch import memory
    from dilated_attention_pytorch.backends.triton import launch
    from dilated_attention_pytorch.plan import make_plan

    monkeypatch.setattr(launch, "DQ_MODE", dq_mode)
    monkeypatch.setattr(launch, "PACKED_ROW_TERMS", packed)
    N, H, D = 1 << 16, 16, 64
    plan = make_plan(*LONGNET, H)
    q, k, v, dout = (torch.empty(1, N, H, D, device="meta", dtype=torch.bfloat16) for _ in range(4))
    flags: list = []
    launch_backward = launch._launch_backward
    monkeypatch.setattr(
        launch, "_launch_backward",
        lambda *a, **kw: flags.append(kw["packed"]) or launch_backward(*a, **kw),
    )  # fmt: skip
    calls: list = []
    with kr.recording(calls):
        out, lse = launch.dilated_forward(q, k, v, plan, scale=D**-0.5)
        launch.dilated_backward(dout, q, k, v, out, lse, plan, scale=D**-0.5)
    launched = {c[0] for c in calls}
    extra = memory._triton_extra(plan, 1, N, H, D, 1)
    added = dq_mode != "separate"
    assert extra["triton_dq_add"] == (1 if added else 0)
    assert extra["triton_joint_dq"] == extra["triton_joint_dkdv"] == (not added)
    assert ("_joint_dkdv_kernel" in launched) == extra["triton_joint_dkdv"]
    assert ("_joint_dq_kernel" in launched) == extra["triton_joint_dq"]
    assert extra["triton_packed_rows"] == (packed and not added)
    assert set(flags) == (set() if not added else {False})  # per-branch launches: unpacked


@pytest.mark.parametrize("cap", [-1, 64.0, "64", True])
def test_joint_dkdv_cap_must_be_a_head_dim(kr, monkeypatch, cap) -> None:
    from dilated_attention_pytorch.backends.triton import launch
    from dilated_attention_pytorch.plan import make_plan

    monkeypatch.setattr(launch, "JOINT_DKDV_MAX_HEAD_DIM", cap)
    sched = launch._schedule(make_plan(*LONGNET, 16))
    with pytest.raises(
        ValueError, match=r"JOINT_DKDV_MAX_HEAD_DIM must be None or an int >= 0, got"
    ):
        launch._joint_pass("dkdv", sched, 16, 1 << 16, 64, 1, causal=False, documents=None)
