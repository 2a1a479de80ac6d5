"""Triton backend on CUDA in bf16/fp16 at real sizes, against the pytorch backend in fp32.

Tolerance rule (flash-attn's): the kernel's error against the fp32 result
must be at most twice the error of PyTorch's own low-precision pipeline (the
``pytorch`` backend run in the same dtype) plus a small eps. The dense oracle is
O(N^2), so the fp32 truth here is the pytorch backend on fp32 copies of the inputs
(itself tested against the oracle on CPU).

Unwritten elements are caught by poisoning: before each run the CUDA caching
allocator is handed NaN-filled blocks of exactly the sizes the kernels allocate, so
an output element nobody writes stays NaN and fails the finiteness check.
Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import dense_dilated_attention, dilated_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

if torch.cuda.is_available():
    from dilated_attention_pytorch.backends.blocks import (
        flash_block_backward,
        flash_block_forward,
        math_block_backward,
        math_block_forward,
    )
    from dilated_attention_pytorch.backends.triton import (
        triton_block_backward,
        triton_block_forward,
    )

EPS = 1e-4  # absolute slack for elements where both errors are ~0


def _poison(*shapes_dtypes: tuple[tuple[int, ...], torch.dtype], copies: int = 3) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator's free lists."""
    blocks = [
        torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        for shape, dtype in shapes_dtypes
        for _ in range(copies)
    ]
    torch.cuda.synchronize()
    del blocks


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def _check(name: str, x: torch.Tensor, ref: torch.Tensor, low: torch.Tensor) -> None:
    assert torch.isfinite(x).all(), f"{name}: non-finite values (unwritten or NaN)"
    err, low_err = _max_err(x, ref), _max_err(low, ref)
    assert err <= 2 * low_err + EPS, (
        f"{name}: error {err:.3g} vs reference-low-precision {low_err:.3g}"
    )


def _run(q, k, v, dout, ws, rs, backend, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = dilated_attention(q, k, v, ws, rs, backend=backend, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out, lse, grads


CASES = [
    # (B, N, H, D, segment_lengths, dilation_rates)
    (2, 8192 + 97, 8, 64, [512, 1024, 2048, 4096], [1, 2, 4, 8]),
    (1, 16384, 16, 64, [2048, 4096, 8192, 16384], [1, 2, 4, 8]),
]


def _compare(B, N, H, D, ws, rs, dtype, **kwargs) -> None:
    q, k, v, dout = (torch.randn(B, N, H, D, device="cuda", dtype=dtype) for _ in range(4))
    ref_out, ref_lse, ref_grads = _run(
        q.float(), k.float(), v.float(), dout.float(), ws, rs, "pytorch", **kwargs
    )
    low_out, low_lse, low_grads = _run(q, k, v, dout, ws, rs, "pytorch", **kwargs)
    _poison(((B, N, H, D), dtype), ((B, N, H), torch.float32), ((B, N, H, D), torch.float32))
    out, lse, grads = _run(q, k, v, dout, ws, rs, "triton", **kwargs)
    _check("out", out, ref_out, low_out)
    # LSE is fp32 on both sides (-inf for rows with no key, matching exactly).
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    _check("lse", lse[finite], ref_lse[finite], low_lse[finite])
    for n, g, rg, lg in zip("qkv", grads, ref_grads, low_grads, strict=True):
        _check(f"d{n}", g, rg, lg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[1]}-H{c[2]}")
def test_triton_matches_reference_fp32(case, branch_mixing, is_causal, dtype) -> None:
    B, N, H, D, ws, rs = case
    _compare(B, N, H, D, ws, rs, dtype, is_causal=is_causal, branch_mixing=branch_mixing)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("D", [16, 32, 128])
def test_triton_other_head_dims(D, is_causal) -> None:
    # D=128 without causality: the dK/dV kernel's scalar-base form (whole query tiles,
    # then ragged ones: 1000 and 3000 / 3 are not multiples of the tiles).
    _compare(1, 6000 + 1, 4, D, [1000, 3000], [1, 3], torch.bfloat16, is_causal=is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_triton_key_padding_mask(is_causal, ws=(256, 1024, 2048), rs=(1, 2, 4)) -> None:
    # The pytorch backend takes its fp32 math path when a mask is given, so the
    # low-precision baseline here is the dense oracle computed in bf16 (O(N^2), hence
    # the smaller N), and the truth the same oracle in fp64.
    B, N, H, D = 2, 2048 + 33, 4, 64
    ws, rs = list(ws), list(rs)
    mask = torch.rand(B, N, device="cuda") < 0.2
    mask[1, :300] = True  # the first segments of one batch element lose most keys
    q, k, v, dout = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kw = dict(is_causal=is_causal, key_padding_mask=mask)

    def dense(upcast: bool):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = dense_dilated_attention(qq, kk, vv, ws, rs, return_lse=True, upcast=upcast, **kw)
        return out, lse, torch.autograd.grad(out, (qq, kk, vv), dout)

    ref, low = dense(True), dense(False)
    _poison(((B, N, H, D), torch.bfloat16), ((B, N, H), torch.float32))
    out, lse, grads = _run(q, k, v, dout, ws, rs, "triton", **kw)
    _check("out", out, ref[0], low[0])
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))
    for n, g, rg, lg in zip("qkv", grads, ref[2], low[2], strict=True):
        _check(f"d{n}", g, rg, lg)


@pytest.mark.parametrize(
    "Lq,Lk,is_causal", [(2048, 2048, False), (2048, 2048, True), (1000, 3000, False)]
)
def test_triton_block_ops(Lq, Lk, is_causal) -> None:
    # Token-major strided blocks (a head slice of a larger tensor), as the ring passes
    # them. Low-precision baseline: PyTorch's flash op (the pytorch backend's block kernel).
    Bb, Hs, D, scale = 4, 4, 64, 0.125
    dtype = torch.bfloat16
    q = torch.randn(Bb, Lq, 2 * Hs, D, device="cuda", dtype=dtype)[:, :, ::2]
    k, v = (torch.randn(Bb, Lk, Hs, D, device="cuda", dtype=dtype) for _ in range(2))
    dout = torch.randn(Bb, Lq, Hs, D, device="cuda", dtype=dtype)
    kw = dict(scale=scale, causal=is_causal)
    ref = math_block_forward(q.float(), k.float(), v.float(), **kw)
    ref_g = math_block_backward(dout.float(), q.float(), k.float(), v.float(), *ref, **kw)
    low = flash_block_forward(q, k, v, **kw)
    low_g = flash_block_backward(dout, q, k, v, *low, **kw)
    _poison(((Bb, Lq, Hs, D), dtype), ((Bb, Lk, Hs, D), dtype), ((Bb, Lq, Hs), torch.float32))
    out, lse = triton_block_forward(q, k, v, **kw)
    grads = triton_block_backward(dout, q, k, v, out, lse, **kw)
    _check("out", out, ref[0], low[0])
    _check("lse", lse, ref[1], low[1])
    for n, g, rg, lg in zip("qkv", grads, ref_g, low_g, strict=True):
        _check(f"d{n}", g, rg, lg)


@pytest.mark.parametrize("is_causal", [False, True])
def test_triton_block_ops_key_mask(is_causal) -> None:
    # The ring's masked blocks: a strided (dilated) key keep mask. Low-precision
    # baseline: PyTorch's flash op on each row's kept keys only (what the mask means;
    # causal masks align by position, so the causal case keeps every key).
    Bb, L, Hs, D, scale = 3, 1024, 4, 64, 0.125
    dtype = torch.bfloat16
    q, k, v, dout = (torch.randn(Bb, L, Hs, D, device="cuda", dtype=dtype) for _ in range(4))
    keep = (torch.rand(Bb, 2 * L, device="cuda") > 0.3)[:, ::2]
    if is_causal:
        keep = torch.ones(Bb, L, dtype=torch.bool, device="cuda")
    kw = dict(scale=scale, causal=is_causal)
    ref = math_block_forward(q.float(), k.float(), v.float(), key_keep=keep, **kw)
    ref_g = math_block_backward(
        dout.float(), q.float(), k.float(), v.float(), *ref, key_keep=keep, **kw
    )
    low_out, low_lse = torch.empty_like(q), torch.empty(Bb, L, Hs, device="cuda")
    low_g = [torch.zeros_like(t) for t in (q, k, v)]
    for b in range(Bb):
        kb, vb = k[b : b + 1, keep[b]], v[b : b + 1, keep[b]]
        out_b, lse_b = flash_block_forward(q[b : b + 1], kb, vb, **kw)
        g = flash_block_backward(dout[b : b + 1], q[b : b + 1], kb, vb, out_b, lse_b, **kw)
        low_out[b], low_lse[b] = out_b[0], lse_b[0]
        low_g[0][b] = g[0][0]
        low_g[1][b, keep[b]], low_g[2][b, keep[b]] = g[1][0], g[2][0]
    out, lse = triton_block_forward(q, k, v, key_keep=keep, **kw)
    grads = triton_block_backward(dout, q, k, v, out, lse, key_keep=keep, **kw)
    _check("out", out, ref[0], low_out)
    _check("lse", lse, ref[1], low_lse)
    for n, g, rg, lg in zip("qkv", grads, ref_g, low_g, strict=True):
        _check(f"d{n}", g, rg, lg)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_triton_block_ops_grouped_query(D, is_causal) -> None:
    # The ring's blocks with 4 query heads per K/V head: dK/dV through the grouped
    # programs. Low-precision baseline: PyTorch's flash op on K/V repeated per query head,
    # its dK/dV summed over each group.
    Bb, L, H, Hkv, scale = 2, 2048, 8, 2, D**-0.5
    dtype = torch.bfloat16
    q, dout = (torch.randn(Bb, L, H, D, device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(Bb, L, Hkv, D, device="cuda", dtype=dtype) for _ in range(2))
    kw = dict(scale=scale, causal=is_causal)
    ref = math_block_forward(q.float(), k.float(), v.float(), **kw)
    ref_g = math_block_backward(dout.float(), q.float(), k.float(), v.float(), *ref, **kw)
    kr, vr = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    low = flash_block_forward(q, kr, vr, **kw)
    low_g = list(flash_block_backward(dout, q, kr, vr, *low, **kw))
    for i in (1, 2):
        low_g[i] = low_g[i].float().unflatten(2, (Hkv, H // Hkv)).sum(3).to(dtype)
    _poison(((Bb, L, H, D), dtype), ((Bb, L, Hkv, D), dtype), ((Bb, L, Hkv, D), torch.float32))
    out, lse = triton_block_forward(q, k, v, **kw)
    grads = triton_block_backward(dout, q, k, v, out, lse, **kw)
    _check("out", out, ref[0], low[0])
    _check("lse", lse, ref[1], low[1])
    for n, g, rg, lg in zip("qkv", grads, ref_g, low_g, strict=True):
        assert g.shape == rg.shape, f"d{n}: shape {tuple(g.shape)}, expected {tuple(rg.shape)}"
        _check(f"d{n}", g, rg, lg)


@pytest.mark.parametrize("dq_mode", ["atomic", "tma"])
@pytest.mark.parametrize(
    "case",
    ["softmax", "causal", "head_split", "gqa", "mask", "D128"],
)
def test_triton_dq_added_by_the_dkdv_kernel(case, dq_mode, monkeypatch) -> None:
    # DQ_MODE "atomic"/"tma": the dK/dV kernel adds dQ into an fp32 buffer (no dQ kernel);
    # same tolerance rule as the separate dQ kernel.
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setattr(launch, "DQ_MODE", dq_mode)
    if case == "mask":
        test_triton_key_padding_mask(True)
        return
    B, N, H, D, ws, rs = CASES[0]
    kw = dict(is_causal=case != "softmax")
    if case == "head_split":
        kw["branch_mixing"] = "head_split"
    if case == "D128":
        D = 128
    if case == "gqa":
        _compare_grouped(B, N, H, H // 4, D, ws, rs, **kw)
        return
    _compare(B, N, H, D, ws, rs, torch.bfloat16, **kw)


def _compare_grouped(B, N, H, H_kv, D, ws, rs, **kwargs) -> None:
    # Grouped-query attention: k and v with H_kv < H heads; same rule as _compare.
    q, k, v, dout = (torch.randn(B, N, n, D, device="cuda", dtype=torch.bfloat16)
                     for n in (H, H_kv, H_kv, H))  # fmt: skip
    ref = _run(q.float(), k.float(), v.float(), dout.float(), ws, rs, "pytorch", **kwargs)
    low = _run(q, k, v, dout, ws, rs, "pytorch", **kwargs)
    _poison(((B, N, H, D), torch.bfloat16), ((B, N, H, D), torch.float32))
    got = _run(q, k, v, dout, ws, rs, "triton", **kwargs)
    _check("out", got[0], ref[0], low[0])
    for n, g, rg, lg in zip("qkv", got[2], ref[2], low[2], strict=True):
        _check(f"d{n}", g, rg, lg)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_triton_grouped_query_attention(D, is_causal) -> None:
    # The default (separate) dQ kernel with 4 query heads per K/V head: the grouped dK/dV
    # programs (one per K/V head and offset class, adding up their query heads' shares).
    # backend="auto" trains such calls on Triton.
    B, N, H, _, ws, rs = CASES[0]
    _compare_grouped(B, N, H, H // 4, D, ws, rs, is_causal=is_causal)


@pytest.mark.parametrize("dq_mode", ["separate", "tma"])
@pytest.mark.parametrize("case", ["softmax", "causal", "head_split", "mask", "D128"])
def test_triton_tma_loads(case, dq_mode, monkeypatch) -> None:
    # LOAD_MODE "tma": every kernel reads its q, k, v, dO tiles through tensor descriptors
    # (on Hopper); same cases and tolerance rule as the pointer loads.
    from dilated_attention_pytorch.backends.triton import launch

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need a Hopper GPU")
    monkeypatch.setattr(launch, "LOAD_MODE", "tma")
    chosen = []
    tma_loads = launch._tma_loads
    monkeypatch.setattr(launch, "_tma_loads", lambda *t: chosen.append(tma_loads(*t)) or chosen[-1])
    test_triton_dq_added_by_the_dkdv_kernel(case, dq_mode, monkeypatch)
    assert chosen and all(chosen)


@pytest.mark.parametrize(
    "case",
    [
        "pointer", "tma", "pointer-unpacked", "tma-unpacked", "D128", "D128-dkdv-per-branch",
        "mask", "mask-causal",
    ],
)  # fmt: skip
def test_triton_joint_passes(case, monkeypatch) -> None:
    # LongNet plans whose forward, dQ and dK/dV passes each run in one launch for all
    # branches (the first segment holds w_0 / r_max = 128 or more positions of each class
    # per unit, at least every kernel's tile), with a ragged last segment: the joint
    # launches run (none causal: those run per branch) and meet the same tolerance rule.
    # "dkdv-per-branch": JOINT_DKDV_MAX_HEAD_DIM below D, the forward and dQ joint only.
    # "unpacked": the joint dK/dV reads the row terms as three values (PACKED_ROW_TERMS).
    from dilated_attention_pytorch.backends.triton import launch

    ran = []

    def counted(name):
        run = getattr(launch, name)

        def wrapper(*args, **kwargs):
            ran.append(name)
            return run(*args, **kwargs)

        return wrapper

    for name in ("_joint_forward", "_joint_dq", "_joint_dkdv"):
        monkeypatch.setattr(launch, name, counted(name))
    if case.startswith("tma"):
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("tensor descriptors need a Hopper GPU")
        monkeypatch.setattr(launch, "LOAD_MODE", "tma")
    if case.startswith("pointer"):  # "auto" reads through descriptors on Hopper
        monkeypatch.setattr(launch, "LOAD_MODE", "pointer")
    monkeypatch.setattr(launch, "PACKED_ROW_TERMS", not case.endswith("unpacked"))
    monkeypatch.setattr(
        launch, "JOINT_DKDV_MAX_HEAD_DIM", 64 if case.endswith("dkdv-per-branch") else None
    )
    if case.startswith("mask"):
        # The dense oracle (fp64 truth, bf16 baseline) with a key padding mask.
        test_triton_key_padding_mask(case == "mask-causal", [512, 1024, 2048], [1, 2, 4])
    else:
        D = 128 if case.startswith("D128") else 64
        ws, rs = [2048, 4096, 8192, 16384], [1, 2, 4, 8]
        _compare(1, 16384 + 2048 + 97, 8, D, ws, rs, torch.bfloat16)
    expected = [] if case == "mask-causal" else ["_joint_forward", "_joint_dkdv", "_joint_dq"]
    if case.endswith("dkdv-per-branch"):
        expected.remove("_joint_dkdv")
    assert ran == expected


def test_triton_deterministic_backward_is_bitwise_repeatable(monkeypatch) -> None:
    # With torch.use_deterministic_algorithms(True) the backward takes the separate dQ
    # kernel whatever DQ_MODE says: two runs give the same bits.
    from dilated_attention_pytorch.backends.triton import launch

    monkeypatch.setattr(launch, "DQ_MODE", "tma")
    B, N, H, D, ws, rs = CASES[0]
    q, k, v, dout = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first = _run(q, k, v, dout, ws, rs, "triton", is_causal=True)[2]
        second = _run(q, k, v, dout, ws, rs, "triton", is_causal=True)[2]
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
