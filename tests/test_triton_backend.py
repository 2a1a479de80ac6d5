"""Triton backend under the interpreter (``TRITON_INTERPRET=1``, CPU) against the dense oracle.

The kernels run in fp32 on small shapes with 16x16 tiles (the interpreter's config),
so odd lengths, ragged last segments, partial tiles and the causal diagonal are all
exercised. Skipped when Triton is not installed.

Tolerance: the interpreter computes every dot in fp32 with fp32 accumulation, against
the float64 oracle; softmax/matmul roundoff grows like sqrt(#keys) * 6e-8, well under
2e-5 for the <= 100 keys per row here (the same bound as the pytorch backend's
fp32 test).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from dilated_attention_pytorch import dense_dilated_attention, dilated_attention  # noqa: E402
from dilated_attention_pytorch.backends import AttentionCall, get_backend  # noqa: E402
from dilated_attention_pytorch.backends.blocks import (  # noqa: E402
    math_block_backward,
    math_block_forward,
)
from dilated_attention_pytorch.plan import make_plan  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)

# ``triton.jit`` (Triton's own tl.zeros, tl.max, ... included) decides at import time
# whether to interpret, so the kernels can only be interpreted in a process that had
# TRITON_INTERPRET=1 before importing triton. In any other process (a plain `pytest`)
# this file re-runs itself in a subprocess with the variable set; other test modules
# never see it, so their backend="auto" choices are unaffected.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess"
)


@pytest.mark.skipif(INTERPRETING, reason="already interpreting")
def test_interpreted_suite_in_subprocess() -> None:
    from conftest import run_file_interpreted

    run_file_interpreted(__file__)


@pytest.fixture
def kernels():
    from dilated_attention_pytorch.backends.triton import launch

    return launch


def _compare(B, N, H, ws, rs, *, D=16, mask_p=0.0, kv_heads=None, tol=TOL, **kwargs) -> None:
    H_kv = kv_heads or H
    q = torch.randn(B, N, H, D, requires_grad=True)
    k, v = (torch.randn(B, N, H_kv, D, requires_grad=True) for _ in range(2))
    mask = None
    if mask_p > 0:
        mask = torch.rand(B, N) < mask_p
        mask[0, : N // 3] = True  # whole segments without keys: rows output 0, lse -inf
    kw = dict(key_padding_mask=mask, **kwargs)
    out, lse = dilated_attention(q, k, v, ws, rs, return_lse=True, backend="triton", **kw)
    ref_out, ref_lse = dense_dilated_attention(q, k, v, ws, rs, return_lse=True, **kw)
    torch.testing.assert_close(out, ref_out, **tol)
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), **tol)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@interpreted
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
def test_branches_with_r1_and_ragged_segments(branch_mixing, is_causal) -> None:
    # N odd; 40 % 3 != 0; the r = 1 branch runs last and writes the output dtype.
    _compare(2, 97, 4, [16, 40], [1, 3], is_causal=is_causal, branch_mixing=branch_mixing)


@interpreted
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
def test_branches_without_r1(branch_mixing, is_causal) -> None:
    # No branch covers everything: uncovered positions give 0 / -inf and the fp32
    # accumulator is cast once; r = 7 > H = 5 leaves offsets unused; w = 128 > N.
    _compare(1, 71, 5, [10, 25, 128], [2, 3, 7], is_causal=is_causal, branch_mixing=branch_mixing)


@interpreted
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
def test_key_padding_mask(branch_mixing, is_causal) -> None:
    _compare(
        2, 61, 3, [8, 32], [1, 2], mask_p=0.3, is_causal=is_causal, branch_mixing=branch_mixing
    )


def _joint(kernels, ws, rs, H, *, n=1 << 20, block_m=4, mixing="softmax", **kw):
    sched = kernels._schedule(make_plan(ws, rs, H, branch_mixing=mixing))
    return kernels._joint_branches(
        sched, H, n, causal=kw.get("causal", False), documents=kw.get("documents"),
        block_m=block_m,
    )  # fmt: skip


def test_joint_branches_take_nesting_softmax_plans(kernels, monkeypatch) -> None:
    # LongNet's plan: rates 1..16 nest, 2048 is a multiple of 16, offsets h % r nest, and
    # a unit holds 2048 / 16 = 128 positions of each view of the class of rate 16.
    longnet = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
    joint = _joint(kernels, *longnet, 16, block_m=128)
    assert joint is not None and joint.rates == (1, 2, 4, 8, 16) and joint.unit == 2048
    assert joint.segments == (2048, 4096, 8192, 16384, 32768) and joint.head0 == (0,) * 5
    assert _joint(kernels, *longnet, 16, n=1000, block_m=128).unit == 1000  # N < 2048
    assert _joint(kernels, [12, 36], [1, 3], 4) is not None  # a ratio of 3: two views
    # Not taken: views shorter than a tile (most of each tile would be padding, looping
    # over every branch's keys), causal, packed documents, head_split, a single branch,
    # no tokens, the first segment not a multiple of the largest rate (units would start
    # off the rates' grid), rates that do not divide each other, no r = 1 branch,
    # segments that do not nest, segments past int32.
    assert _joint(kernels, *longnet, 16, block_m=256) is None
    assert _joint(kernels, [64, 4096], [1, 2], 4, block_m=64) is None
    assert _joint(kernels, [8, 32], [1, 2], 4, causal=True) is None
    assert _joint(kernels, [8, 32], [1, 2], 4, documents=[20, 44]) is None
    assert _joint(kernels, [8, 32], [1, 2], 4, mixing="head_split") is None
    assert _joint(kernels, [32], [1], 4) is None
    assert _joint(kernels, [8, 32], [1, 2], 4, n=0) is None
    assert _joint(kernels, [1000, 3000], [1, 3], 4) is None
    assert _joint(kernels, [12, 24, 48], [1, 2, 3], 6) is None
    assert _joint(kernels, [8, 32], [2, 4], 4) is None
    assert _joint(kernels, [8, 20], [1, 2], 4) is None
    assert _joint(kernels, [2**39, 2**40], [1, 2], 4) is None
    monkeypatch.setattr(kernels, "BRANCH_MODE", "per_branch")
    assert _joint(kernels, [8, 32], [1, 2], 4) is None
    monkeypatch.setattr(kernels, "BRANCH_MODE", "fused")
    with pytest.raises(ValueError, match=r"BRANCH_MODE must be one of \('joint', 'per_branch'\)"):
        _joint(kernels, [8, 32], [1, 2], 4)


def test_joint_programs(kernels) -> None:
    # (class, view, tile) per unit, the class covered by most branches first. Rates 1, 2,
    # 8 in units of 16 positions with 2-row tiles: class 2 (rate 8: stride 8, 2 rows, one
    # tile), class 1 (rate 2 not 8: 3 views of stride 8, one tile each), class 0 (rate 1
    # not 2: stride 2, 8 rows, four tiles).
    assert kernels._joint_programs((1, 2, 8), 16, 2) == (
        (2, 0, 0), (1, 0, 0), (1, 1, 0), (1, 2, 0), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3),
    )  # fmt: skip


def _count_joint_launches(kernels, monkeypatch) -> list:
    ran: list = []
    for name in ("_joint_forward", "_joint_dkdv", "_joint_dq"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, fn=fn, name=name, **kw: ran.append(name) or fn(*a, **kw)
        )
    return ran


# Plans the joint kernels take with the interpreter's 16-row tiles: the first segment
# length is at least 16 times the largest rate.
JOINT_CASES = {
    "longnet": ([64, 128, 256], [1, 2, 4], dict(B=2, N=150, H=4)),
    "ratio3_gqa": ([48, 144], [1, 3], dict(B=1, N=100, H=6, kv_heads=2)),
    "mask": ([32, 64], [1, 2], dict(B=2, N=90, H=3, mask_p=0.3)),
    "short": ([64, 128], [1, 2], dict(B=1, N=40, H=2)),  # N below the first segment
}


@interpreted
@pytest.mark.parametrize(
    ("case", "load_mode"),
    [("longnet", "pointer"), ("ratio3_gqa", "pointer"), ("mask", "tma"), ("short", "tma")],
)
def test_joint_kernels_match_per_branch_and_oracle(kernels, monkeypatch, case, load_mode):
    # The joint forward (one launch, one online softmax over every covering branch's
    # keys), joint dK/dV (one launch over key tiles, each looping over the query tiles of
    # every branch that reads it) and joint dQ (one launch, dQ summed over the covering
    # branches' keys in registers) against the dense oracle, and against the per-branch
    # launches merging through fp32 accumulators: the same output, LSE pair and
    # gradients up to float32 rounding. Ragged N (the last unit and segments short),
    # grouped-query heads (dK/dV per branch), key padding, both load forms.
    monkeypatch.setattr(kernels, "LOAD_MODE", load_mode)
    ran = _count_joint_launches(kernels, monkeypatch)
    ws, rs, kw = JOINT_CASES[case]
    _compare(ws=ws, rs=rs, **kw)
    # dK/dV runs jointly with one K/V head per query head only.
    launches = ["_joint_forward", "_joint_dq"]
    if "kv_heads" not in kw:
        launches.insert(1, "_joint_dkdv")
    assert ran == launches
    B, N, H = kw["B"], kw["N"], kw["H"]
    q = torch.randn(B, N, H, 16, requires_grad=True)
    k, v = (torch.randn(B, N, kw.get("kv_heads", H), 16, requires_grad=True) for _ in range(2))
    mask = torch.rand(B, N) < 0.3 if case == "mask" else None
    results = {}
    for mode in ("joint", "per_branch"):
        monkeypatch.setattr(kernels, "BRANCH_MODE", mode)
        out, lse = dilated_attention(
            q, k, v, ws, rs, key_padding_mask=mask, return_lse=True, backend="triton"
        )
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results[mode] = (out, lse, *grads)
    torch.testing.assert_close(results["joint"], results["per_branch"], **TOL)
    assert ran == launches * 2


@interpreted
@pytest.mark.parametrize(
    ("tiles", "joint"),
    [((16, 32), ["_joint_forward", "_joint_dq"]), ((32, 16), ["_joint_dkdv"])],
)
def test_joint_passes_decided_by_their_own_tiles(kernels, monkeypatch, tiles, joint) -> None:
    # The forward and dQ passes take a plan jointly when their query tiles (block_m rows)
    # fit the first segment's views, the dK/dV pass when its key tiles (block_n rows) do:
    # with 16 rows per view, a 32-row tile sends a pass back to the per-branch launches
    # while the others stay joint, and the results are the oracle's either way.
    monkeypatch.setattr(kernels, "_INTERPRET_CONFIG", kernels.KernelConfig(*tiles, 1, 1))
    ran = _count_joint_launches(kernels, monkeypatch)
    _compare(2, 70, 3, [32, 64], [1, 2])
    assert ran == joint


@interpreted
def test_joint_kernels_on_head_chunks(kernels, monkeypatch) -> None:
    # Parts of a plan (plan.heads_plan, as the recomputing layer's backward runs them):
    # heads 1..4 and 3..5 start at heads whose offsets are not 0 (head0 of the offset
    # rule < 0). Each part's output, LSE pair and gradients are those heads' of the
    # whole plan.
    from dilated_attention_pytorch.plan import heads_plan

    ran = _count_joint_launches(kernels, monkeypatch)
    B, N, H, D = 1, 150, 6, 16
    plan = make_plan([64, 128, 256], [1, 2, 4], H)
    q, k, v, dout = (torch.randn(B, N, H, D) for _ in range(4))
    out, lse = kernels.dilated_forward(q, k, v, plan, scale=0.25)
    grads = kernels.dilated_backward(dout, q, k, v, out, lse, plan, scale=0.25)
    for lo, hi in ((1, 4), (3, 6)):
        part = heads_plan(plan, lo, hi)
        qs, ks, vs, ds = (t[:, :, lo:hi].contiguous() for t in (q, k, v, dout))
        o, pair = kernels.dilated_forward(qs, ks, vs, part, scale=0.25)
        g = kernels.dilated_backward(ds, qs, ks, vs, o, pair, part, scale=0.25)
        torch.testing.assert_close(o, out[:, :, lo:hi], **TOL)
        torch.testing.assert_close(pair, lse[..., lo:hi], **TOL)
        for a, b in zip(g, grads, strict=True):
            torch.testing.assert_close(a, b[:, :, lo:hi], **TOL)
    assert ran == ["_joint_forward", "_joint_dkdv", "_joint_dq"] * 3


@interpreted
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_joint_kernels_with_an_infinite_key(kernels, monkeypatch, value) -> None:
    # A key entry of +-inf gives some rows a score of +inf: their LSE is +inf (as the
    # dense softmax and the per-branch merge give it), not NaN, so the backward's P of
    # their other keys stays 0 and finite keys keep finite gradients. The joint and the
    # per-branch kernels agree on every non-finite element.
    ws, rs, N = [32, 64], [1, 2], 80
    q, k, v, dout = (torch.randn(1, N, 2, 16) for _ in range(4))
    k[0, 3, 0, 5] = value
    results = {}
    for mode in ("joint", "per_branch"):
        monkeypatch.setattr(kernels, "BRANCH_MODE", mode)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = dilated_attention(qq, kk, vv, ws, rs, backend="triton", return_lse=True)
        results[mode] = (out, lse, *torch.autograd.grad(out, (qq, kk, vv), dout))
    ref_lse = dense_dilated_attention(q, k, v, ws, rs, return_lse=True)[1]
    assert torch.isposinf(results["joint"][1]).any()
    assert torch.equal(torch.isposinf(results["joint"][1]), torch.isposinf(ref_lse))
    for a, b in zip(results["joint"], results["per_branch"], strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], **TOL)


@interpreted
def test_joint_dkdv_reads_an_unaligned_dout_by_pointer(kernels, monkeypatch) -> None:
    # The joint dK/dV kernel reads dO in its loops: with LOAD_MODE "tma" it takes
    # descriptor loads only when dO allows them too. A gradient narrowed from a wider
    # tensor (strides of 17 elements, not a multiple of 16 bytes) reads by pointer, and
    # the gradients are the oracle's; a descriptor of it would be rejected.
    monkeypatch.setattr(kernels, "LOAD_MODE", "tma")
    ran = _count_joint_launches(kernels, monkeypatch)
    ws, rs, (B, N, H, D) = [32, 64], [1, 2], (1, 40, 2, 16)
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3))
    dout = torch.randn(B, N, H, D + 1)[..., :D]
    assert not kernels._tma_loads(dout)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    out = dilated_attention(qf, kf, vf, ws, rs, backend="triton")
    grads = torch.autograd.grad(out, (qf, kf, vf), dout)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    ref = dense_dilated_attention(qd, kd, vd, ws, rs)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    assert "_joint_dkdv" in ran
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg.float(), **TOL)


@interpreted
@pytest.mark.parametrize("shape", [(2, 37, 3), (1, 5, 1), (3, 1, 4), (1, 1, 1)])
@pytest.mark.parametrize("pair", [False, True])
def test_backward_rows_heads_first(kernels, shape, pair) -> None:
    # The backward's LSE copy and delta: same values and shapes (a pair's lo in log2
    # units), each head's rows next to each other (row stride 1 where there is more than
    # one row), and delta with the strides of one LSE plane, size-1 dims included (the
    # block-sparse kernels read both with one set of strides). The forward's LSE is not
    # touched.
    B, N, H = shape
    lse = torch.randn(2, B, N, H) if pair else torch.randn(B, N, H)
    before = lse.clone()
    dout, out = torch.randn(B, N, H, 16), torch.randn(B, N, H, 16)
    lse_hf, delta = kernels._backward_rows(dout, out, lse)
    assert torch.equal(lse, before) and lse_hf.shape == lse.shape
    want_lse = torch.stack([lse[0], lse[1] * math.log2(math.e)]) if pair else lse
    assert torch.equal(lse_hf, want_lse)
    plane = lse_hf[0] if pair else lse_hf
    want = (N * H, 1, N)  # heads-first; a size-1 dim's stride is never used
    assert all(n == 1 or st == w for n, st, w in zip(plane.shape, plane.stride(), want))
    assert delta.shape == (B, N, H) and delta.stride() == plane.stride()
    torch.testing.assert_close(delta, (dout * out).sum(-1), **TOL)


@interpreted
@pytest.mark.parametrize("shape", [(2, 37, 3), (1, 1, 1)])
@pytest.mark.parametrize("pair", [False, True])
def test_backward_rows_packed(kernels, shape, pair) -> None:
    # Packed row terms: one (hi, lo2, delta, 0) word per row, heads-first, hi with -inf
    # (a row with no key) as +inf; the pair and delta returned are views of the words
    # with the values the unpacked form holds.
    B, N, H = shape
    lse = torch.randn(2, B, N, H) if pair else torch.randn(B, N, H)
    (lse[0] if pair else lse)[0, 0, 0] = -math.inf
    (lse[0] if pair else lse)[-1, -1, -1] = math.nan  # stays NaN (the forward's own NaN)
    dout, out = torch.randn(B, N, H, 16), torch.randn(B, N, H, 16)
    packed_pair, delta = kernels._backward_rows(dout, out, lse, packed=True)
    words = kernels._row_words(packed_pair)
    assert words.shape == (B, H, N, 4) and words.is_contiguous()
    hi = (lse[0] if pair else lse).masked_fill(torch.isneginf(lse[0] if pair else lse), math.inf)
    torch.testing.assert_close(packed_pair[0], hi, rtol=0, atol=0, equal_nan=True)
    assert packed_pair[0].isnan().sum() == 1 and packed_pair[0][-1, -1, -1].isnan()
    lo = lse[1] * math.log2(math.e) if pair else torch.zeros(B, N, H)
    assert torch.equal(packed_pair[1], lo)
    assert torch.equal(words[..., 2], delta.transpose(1, 2))
    torch.testing.assert_close(delta, (dout * out).sum(-1), **TOL)
    assert torch.equal(words[..., 3], torch.zeros(B, H, N))


@interpreted
@pytest.mark.parametrize(
    "ws, rs, H, mixing, kv_heads",
    [
        ([8, 16, 32], [1, 2, 4], 6, "head_split", None),  # heads 0-1 r=1, 2-3 r=2, 4-5 r=4
        ([16, 8, 2], [5, 4, 1], 2, "head_split", None),  # one branch runs no head
        ([12], [3], 5, "softmax", None),  # one branch, r=3, every offset used
        ([12], [4], 2, "softmax", None),  # offsets 2 and 3 run by no head
        ([8, 16], [1, 2], 4, "head_split", 2),  # grouped-query attention: full fill
        ([8, 16], [1, 2], 4, "softmax", None),  # every head in two branches: full fill
        ([8, 16], [1, 1], 4, "softmax", None),  # r=1 everywhere: covered, no fill
    ],
)
@pytest.mark.filterwarnings("ignore:dilated attention with .* leaves some positions")
def test_zero_uncovered_rows(kernels, ws, rs, H, mixing, kv_heads) -> None:
    # Where each (position, head) is covered by at most one branch, the outputs and
    # gradients are allocated empty and only the rows no branch covers are zeroed; the
    # covered rows (here NaN) are left for the kernels. Coverage from the plan's head
    # groups (position p of head h: (p mod w) mod r == the group's offset).
    plan = make_plan(ws, rs, H, branch_mixing=mixing, num_kv_heads=kv_heads)
    sched = kernels._schedule(plan)
    g = H // (kv_heads or H)
    cover = kernels._single_coverage(sched, H, g, None, torch.device("cpu"))
    assert (cover is None) == (sched.full or sched.multi or g > 1)
    if cover is None:
        return
    B, N, D = 2, 37, 16  # N not a multiple of any segment length: ragged last segments
    covered = torch.zeros(N, H, dtype=torch.bool)
    p = torch.arange(N)
    for branch in plan.branches:
        w, r = branch.segment_length, branch.dilation_rate
        for group in branch.head_groups:
            for h in group.heads:
                assert not (covered[:, h] & ((p % w) % r == group.offset)).any()
                covered[:, h] |= (p % w) % r == group.offset
    assert not covered.all()
    tensors = tuple(torch.full((B, N, H, D), math.nan) for _ in range(3))
    for num in (1, 3):
        for t in tensors:
            t.fill_(math.nan)
        kernels._zero_uncovered(tensors[:num], cover)
        for i, t in enumerate(tensors):
            if i >= num:
                assert t.isnan().all()  # not passed: untouched
                continue
            assert t[:, covered].isnan().all()
            assert torch.equal(t[:, ~covered], torch.zeros_like(t[:, ~covered]))
    with pytest.raises(ValueError, match="one shape and strides"):
        kernels._zero_uncovered((tensors[0], tensors[1].transpose(1, 2)), cover)


@interpreted
@pytest.mark.parametrize(
    "n, w, r, head0, h_first, num_heads",
    [(64, 16, 2, 0, 0, 3), (96, 32, 4, -1, 1, 2), (48, 48, 16, 2, 0, 4), (40, 8, 8, 0, 2, 1)],
)
def test_compact_rows(kernels, n, w, r, head0, h_first, num_heads) -> None:
    # A branch's own row terms: row s * (w / r) + t of launch head i is token s*w + o + r*t
    # of head h_first + i, o = (h - head0) % r; from the pair's planes and from delta.
    B, H = 2, 5
    launch = kernels._Launch(w, w, r, head0, h_first, num_heads)
    pair = torch.randn(2, B, H, n).transpose(-1, -2)  # heads-first (2, B, n, H)
    delta = torch.randn(B, H, n).transpose(-1, -2)
    for rows in (pair, delta):
        got = kernels._compact_rows(rows, launch)
        assert got.shape == (*rows.shape[:-2], n // r, num_heads) and got.stride(-2) == 1
        for i in range(num_heads):
            h = h_first + i
            o = (h - head0) % r
            tokens = [s * w + o + r * t for s in range(n // w) for t in range(w // r)]
            assert torch.equal(got[..., i], rows[..., tokens, h])
    # Layouts it does not take: r = 1, n or w not a multiple of r, packed documents.
    assert kernels._compact_rows(delta, kernels._Launch(w, w, 1, 0, 0, 2)) is None
    assert kernels._compact_rows(delta[:, : n - 1], launch) is None
    assert kernels._compact_rows(delta, kernels._Launch(w + 1, w + 1, r, 0, 0, 2)) is None
    docs = kernels._Launch(w, w, r, 0, 0, 2, 1, (delta, delta), w)
    assert kernels._compact_rows(delta, docs) is None
    # Packed row terms (one (hi, lo, delta, 0) word per row): the same rows, gathered as
    # whole words into a new packed buffer.
    words = torch.randn(B, H, n, 4)
    pair, delta = kernels._packed_views(words)
    got_pair, got_delta = kernels._compact_words(pair, launch)
    got = kernels._row_words(got_pair)
    assert got.shape == (B, num_heads, n // r, 4) and got.is_contiguous()
    assert got_delta.data_ptr() == got.data_ptr() + 2 * got.element_size()
    for i in range(num_heads):
        h = h_first + i
        tokens = [s * w + (h - head0) % r + r * t for s in range(n // w) for t in range(w // r)]
        assert torch.equal(got[:, i], words[:, h, tokens])
        assert torch.equal(got_pair[..., i], pair[..., tokens, h])
        assert torch.equal(got_delta[..., i], delta[..., tokens, h])
    assert kernels._compact_words(pair, kernels._Launch(w, w, 1, 0, 0, 2)) is None
    assert kernels._compact_words(pair, docs) is None


@interpreted
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(
    "branch_mixing, H, kv_heads, chunk", [("softmax", 4, 2, False), ("head_split", 6, None, True)]
)
def test_compact_row_terms(
    kernels, monkeypatch, branch_mixing, H, kv_heads, chunk, is_causal, packed
):  # fmt: skip
    # N and every w a multiple of every r: the r > 1 branches read their own rows of the
    # backward's row terms (COMPACT). Against the oracle, and bit for bit against the
    # strided form (same arithmetic, other addresses); with head chunks and grouped K/V;
    # row terms packed (PACKED_ROW_TERMS, gathered by _compact_words) or not.
    monkeypatch.setattr(kernels, "PACKED_ROW_TERMS", packed)
    if chunk:
        monkeypatch.setattr(kernels, "ACC_CHUNK_BYTES", 2 * 64 * 16 * 4 * 2)
    ws, rs, N = [16, 32, 64], [1, 2, 4], 128
    kw = dict(is_causal=is_causal, branch_mixing=branch_mixing)
    _compare(2, N, H, ws, rs, kv_heads=kv_heads, **kw)
    q = torch.randn(2, N, H, 16, requires_grad=True)
    k, v = (torch.randn(2, N, kv_heads or H, 16, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, N, H, 16)
    seen = []
    name = "_compact_words" if packed else "_compact_rows"
    compact_rows = getattr(kernels, name)

    def counted(rows, launch):
        seen.append(compact_rows(rows, launch) is not None)
        return compact_rows(rows, launch)

    grads = []
    for rule in (counted, lambda rows, launch: None):
        monkeypatch.setattr(kernels, name, rule)
        out = dilated_attention(q, k, v, ws, rs, backend="triton", **kw)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    assert any(seen) and not all(seen)  # the r > 1 launches compact, r = 1 does not
    for g, g_strided in zip(*grads, strict=True):
        assert torch.equal(g, g_strided)


@interpreted
def test_head_chunks(kernels, monkeypatch) -> None:
    # Accumulators limited to 2 heads: the plan runs in three head chunks.
    monkeypatch.setattr(kernels, "ACC_CHUNK_BYTES", 2 * 50 * 16 * 4 * 2)
    _compare(2, 50, 5, [8, 20], [1, 4], is_causal=True)


@interpreted
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
def test_grouped_query_attention(branch_mixing, is_causal) -> None:
    # 6 query heads on 2 K/V heads: runs of query heads share a K/V head (r = 1), heads
    # of one K/V head have different offsets (r = 3), and the dK/dV of a K/V head sum
    # its query heads' contributions.
    _compare(
        1, 53, 6, [8, 30], [1, 3], kv_heads=2, mask_p=0.2, is_causal=is_causal,
        branch_mixing=branch_mixing,
    )  # fmt: skip


@interpreted
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(
    "H, H_kv, ws, rs, branch_mixing, grouped",
    [
        # 4 query heads per K/V head: at r = 2 two offset classes of 2 heads, at r = 4
        # four of 1; softmax mixing adds every branch into the K/V-head accumulators.
        (8, 2, [8, 16, 32], [1, 2, 4], "softmax", True),
        # r = 4 > 2 query heads per K/V head: 2 of the 4 offsets per K/V head.
        (4, 2, [8, 32], [1, 4], "softmax", True),
        # 3 query heads per K/V head at r = 2: classes of 2 and 1 heads (the loop must
        # stop at the group's end, not run into the next group's heads).
        (6, 2, [6, 12], [1, 2], "softmax", True),
        # head_split, branches of whole K/V groups: dK/dV written straight, and the rows
        # of the r = 4 branch's K/V heads that none of their query heads reads stay 0.
        (8, 4, [8, 32], [1, 4], "head_split", True),
        # head_split ending inside a K/V group: the per-query-head path.
        (6, 3, [8, 16], [1, 2], "head_split", False),
    ],
)
def test_grouped_dkdv_programs(
    kernels, monkeypatch, H, H_kv, ws, rs, branch_mixing, grouped, is_causal
) -> None:
    # With grouped-query attention a dK/dV program sums the shares of the query heads of
    # one K/V head that read the same key rows (_grouped_dkdv), where the launches run
    # whole K/V groups; pinned here which path each case takes.
    taken = []
    real = kernels._grouped_dkdv
    monkeypatch.setattr(kernels, "_grouped_dkdv", lambda *a: taken.append(real(*a)) or taken[-1])
    _compare(1, 61, H, ws, rs, kv_heads=H_kv, mask_p=0.2, is_causal=is_causal,
             branch_mixing=branch_mixing)  # fmt: skip
    assert taken and all(t == grouped for t in taken)


@interpreted
def test_grouped_dkdv_packed_documents_and_head_chunks(kernels, monkeypatch) -> None:
    # Packed documents (segment tables) and head chunks of 2 K/V groups each.
    monkeypatch.setattr(kernels, "ACC_CHUNK_BYTES", 4 * 60 * 16 * 4)
    cu = torch.tensor([0, 23, 60], dtype=torch.int32)
    _compare(1, 60, 8, [8, 16], [1, 2], kv_heads=4, cu_seqlens=cu, is_causal=True)
    assert len(kernels._head_chunks(True, 1, 60, 8, 16, 2)) == 2


@interpreted
def test_multi_query_attention_in_head_chunks(kernels, monkeypatch) -> None:
    # One K/V head for 4 query heads; accumulators limited to 2 heads: two chunks read
    # the same K/V head.
    monkeypatch.setattr(kernels, "ACC_CHUNK_BYTES", 2 * 40 * 16 * 4 * 2)
    _compare(2, 40, 4, [8, 20], [1, 2], kv_heads=1, is_causal=True)


@interpreted
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(
    "case", ["ragged", "without_r1", "head_split", "mask", "gqa", "head_chunks", "packed"]
)
def test_dq_added_by_the_dkdv_kernel(kernels, monkeypatch, case, is_causal) -> None:
    # DQ_MODE "atomic": no dQ kernel, the dK/dV kernel adds scale * dS K into an fp32
    # buffer ("tma" runs as "atomic" in the interpreter; the GPU tests run "tma").
    monkeypatch.setattr(kernels, "DQ_MODE", "atomic")
    launched = []
    monkeypatch.setattr(kernels, "_bwd_dq_kernel", launched)  # indexing it would fail
    kw = dict(is_causal=is_causal)
    if case == "ragged":
        _compare(2, 97, 4, [16, 40], [1, 3], **kw)
    elif case == "without_r1":
        _compare(1, 71, 5, [10, 25, 128], [2, 3, 7], **kw)
    elif case == "head_split":
        _compare(2, 61, 4, [8, 32], [1, 2], branch_mixing="head_split", **kw)
    elif case == "mask":
        _compare(2, 61, 3, [8, 32], [1, 2], mask_p=0.3, **kw)
    elif case == "gqa":
        _compare(1, 53, 6, [8, 30], [1, 3], kv_heads=2, mask_p=0.2, **kw)
    elif case == "head_chunks":
        monkeypatch.setattr(kernels, "ACC_CHUNK_BYTES", 2 * 50 * 16 * 4 * 2)
        _compare(2, 50, 5, [8, 20], [1, 4], **kw)
    else:
        cu = torch.tensor([0, 13, 53, 60], dtype=torch.int32)  # packed documents
        _compare(1, 60, 4, [8, 16], [1, 2], kv_heads=2, cu_seqlens=cu, **kw)
    assert kernels._dq_add(torch.device("cpu")) == 1


@interpreted
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("load_mode", ["pointer", "tma"])
def test_dq_with_very_negative_scores_past_a_ragged_key_tile(kernels, monkeypatch, dq_mode,
                                                             load_mode) -> None:  # fmt: skip
    # Every score about -100, so the LSE is about -97: rows past the segment's end (a
    # ragged last key tile) load as 0 and score 0, exp(0 - LSE) overflows to inf, and the
    # fused dQ (atomic) once added inf * 0 = NaN from their zero key rows. Such rows must
    # not count anywhere. (Found by fuzzing the D=128 dK/dV path.)
    monkeypatch.setattr(kernels, "DQ_MODE", dq_mode)
    monkeypatch.setattr(kernels, "LOAD_MODE", load_mode)
    g = torch.Generator().manual_seed(0)
    N, D = 20, 16  # one segment of 20 keys: the second 16-key tile is ragged
    a = (100 / D**0.5) ** 0.5
    q = (-a * torch.ones(1, N, 1, D)).requires_grad_()
    k = a * torch.ones(1, N, 1, D) + 0.01 * torch.randn(1, N, 1, D, generator=g)
    k.requires_grad_()
    v = torch.randn(1, N, 1, D, generator=g, requires_grad=True)
    dout = torch.randn(1, N, 1, D, generator=g)
    out = dilated_attention(q, k, v, [N], [1], backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_dilated_attention(*leaves, [N], [1])
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), f"d{name} is not finite"
        # Scores of magnitude 100 in float32: rounding of ~1e-5 in S, below 1e-4 here.
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("case", ["ragged_causal", "without_r1", "mask", "gqa_chunks", "packed"])
def test_tma_loads(kernels, monkeypatch, case, dq_mode) -> None:
    # LOAD_MODE "tma": the loops read q, k, v, dO tiles through tensor descriptors of the
    # dilated rows (rows past the segment read as 0); every kernel takes that path here.
    monkeypatch.setattr(kernels, "LOAD_MODE", "tma")
    monkeypatch.setattr(kernels, "DQ_MODE", dq_mode)
    chosen = []
    tma_loads = kernels._tma_loads
    monkeypatch.setattr(
        kernels, "_tma_loads", lambda *t: chosen.append(tma_loads(*t)) or chosen[-1]
    )
    if case == "ragged_causal":
        _compare(2, 97, 4, [16, 40], [1, 3], is_causal=True)
    elif case == "without_r1":
        _compare(1, 71, 5, [10, 25, 128], [2, 3, 7], branch_mixing="head_split")
    elif case == "mask":
        _compare(2, 61, 3, [8, 32], [1, 2], mask_p=0.3, is_causal=True)
    elif case == "gqa_chunks":
        monkeypatch.setattr(kernels, "ACC_CHUNK_BYTES", 2 * 53 * 16 * 4 * 2)
        _compare(1, 53, 6, [8, 30], [1, 3], kv_heads=2, is_causal=True)
    else:
        cu = torch.tensor([0, 13, 53, 60], dtype=torch.int32)
        _compare(1, 60, 4, [8, 16], [1, 2], cu_seqlens=cu, is_causal=True)
    assert chosen and all(chosen)


@interpreted
def test_tma_loads_fall_back_for_unaligned_tensors(kernels, monkeypatch) -> None:
    # A view starting 4 bytes into its storage cannot be a descriptor's base: pointer
    # loads, same result.
    monkeypatch.setattr(kernels, "LOAD_MODE", "tma")
    B, N, H, D = 1, 40, 2, 16
    q = torch.randn(B, N, H, D + 1)[..., 1:]
    assert not kernels._tma_loads(q)
    k, v = (torch.randn(B, N, H, D) for _ in range(2))
    assert kernels._tma_loads(k, v)
    out = dilated_attention(q, k, v, [8, 20], [1, 2], backend="triton")
    ref = dense_dilated_attention(q, k, v, [8, 20], [1, 2])
    torch.testing.assert_close(out, ref, **TOL)


@interpreted
def test_dq_added_ignores_non_finite_padded_keys(kernels, monkeypatch) -> None:
    # Garbage (inf, NaN) in padded keys and values: dQ of every query stays what the
    # separate dQ kernel gives, finite.
    B, N, H, D = 1, 40, 2, 16
    q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 5:9] = True
    k[mask], v[mask] = float("inf"), float("nan")
    grads = {}
    for mode in ("separate", "atomic"):
        monkeypatch.setattr(kernels, "DQ_MODE", mode)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = dilated_attention(qq, kk, vv, [8, 20], [1, 2], key_padding_mask=mask,
                                is_causal=True, backend="triton")  # fmt: skip
        grads[mode] = torch.autograd.grad(out, qq, torch.ones_like(out))[0]
    assert torch.isfinite(grads["atomic"]).all()
    torch.testing.assert_close(grads["atomic"], grads["separate"], **TOL)


@interpreted
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
def test_shipped_gpu_tiles(kernels, monkeypatch, D: int, is_causal: bool) -> None:
    # The tiles a GPU runs (launch.FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS; e.g. the D=64 dQ
    # kernel's 64 x 64) instead of the interpreter's 16 x 16: each kernel's masks for
    # ragged and partial tiles at those sizes, the r > 1 branch on its gathered row terms
    # (N and w even), against the oracle.
    monkeypatch.setattr(kernels, "_config", lambda table, head_dim: table[head_dim])
    _compare(1, 300, 2, [128, 256], [1, 2], D=D, is_causal=is_causal)


def test_load_mode_rules(kernels, monkeypatch) -> None:
    # "auto" (the default) reads through descriptors on Hopper GPUs only; "tma" also under
    # the interpreter (how the CPU tests reach that path); "pointer" never.
    assert kernels.LOAD_MODE == "auto"
    t = torch.zeros(1, 8, 2, 16)
    for interp, hopper, mode, expected in (
        (False, True, "auto", True), (False, False, "auto", False), (True, False, "auto", False),
        (False, True, "tma", True), (False, False, "tma", False), (True, False, "tma", True),
        (False, True, "pointer", False), (True, False, "pointer", False),
    ):  # fmt: skip
        monkeypatch.setattr(kernels, "interpreting", lambda i=interp: i)
        monkeypatch.setattr(kernels, "_on_hopper", lambda device, h=hopper: h)
        monkeypatch.setattr(kernels, "LOAD_MODE", mode)
        assert kernels._tma_loads(t) is expected, (interp, hopper, mode)
    monkeypatch.setattr(kernels, "LOAD_MODE", "auto")
    monkeypatch.setattr(kernels, "_on_hopper", lambda device: True)
    assert not kernels._tma_loads(torch.zeros(1, 8, 2, 17)[..., 1:])  # unaligned: pointers


def test_dq_mode_rules(kernels, monkeypatch) -> None:
    cpu = torch.device("cpu")
    for mode, expected in (("separate", 0), ("atomic", 1), ("tma", 1)):  # tma: CUDA 9.0+
        monkeypatch.setattr(kernels, "DQ_MODE", mode)
        assert kernels._dq_add(cpu) == expected
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels._dq_add(cpu) == 0  # deterministic: the separate dQ kernel
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(kernels, "LOAD_MODE", "fast")
    expected = r"LOAD_MODE must be one of \('auto', 'pointer', 'tma'\), got 'fast'; 'auto'"
    with pytest.raises(ValueError, match=expected):
        kernels._tma_loads(torch.zeros(1, 1, 1, 16))
    monkeypatch.setattr(kernels, "DQ_MODE", "fast")
    expected = r"DQ_MODE must be one of \('separate', 'atomic', 'tma'\), got 'fast'"
    with pytest.raises(ValueError, match=expected):
        kernels._dq_add(cpu)


@interpreted
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_packed_documents(kernels, monkeypatch, compiled) -> None:
    # cu_seqlens: each document its own sequence, with K/V heads shared, all documents in
    # the same launches (one per branch and kernel, reading a segment table); under
    # torch.compile(fullgraph=True) the offsets enter the operator as a tensor and the
    # launches are the same.
    launches = []
    launch_tiles = kernels._launch_tiles

    def recording(*args, **kwargs):
        launches.append(args[5].segments is not None)
        return launch_tiles(*args, **kwargs)

    monkeypatch.setattr(kernels, "_launch_tiles", recording)
    cu = torch.tensor([0, 19, 20, 53], dtype=torch.int32)  # documents of 19, 1 and 33 tokens
    q = torch.randn(1, 53, 4, 16, requires_grad=True)
    k, v = (torch.randn(1, 53, 2, 16, requires_grad=True) for _ in range(2))
    fn = lambda q, k, v: dilated_attention(  # noqa: E731
        q, k, v, [8, 16], [1, 2], backend="triton", is_causal=True, cu_seqlens=cu
    )
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    ref = dense_dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True, cu_seqlens=cu)
    torch.testing.assert_close(out, ref, **TOL)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL)
    assert launches == [True] * 6  # 2 branches: forward, dK/dV, dQ
    torch._dynamo.reset()


@interpreted
def test_head_dim_32() -> None:
    _compare(1, 45, 2, [12, 45], [1, 2], D=32)


@interpreted
@pytest.mark.parametrize(
    "case", ["padding", "plain_tma", "gqa_packed", "block_ops", "causal_atomic_control"]
)
def test_head_dim_128(kernels, monkeypatch, case) -> None:
    # Head dims above 64 without causality or a fused dQ run the dK/dV kernel's other
    # loop form (scalar LSE and delta addresses; the whole query tiles' LSE and delta
    # without masks, then the ragged last tile): segments of 32 (whole tiles) and 75 / 2
    # (38 and 37 dilated positions, ragged). The control keeps the per-row form.
    monkeypatch.setattr(kernels, "LOAD_MODE", "tma" if "tma" in case else "pointer")
    if case == "padding":
        _compare(1, 75, 2, [32, 75], [1, 2], D=128, mask_p=0.2)
    elif case == "plain_tma":
        _compare(2, 75, 2, [32, 75], [1, 2], D=128)
    elif case == "gqa_packed":
        cu = torch.tensor([0, 21, 70], dtype=torch.int32)
        _compare(1, 70, 4, [16, 40], [1, 2], D=128, kv_heads=2, cu_seqlens=cu)
    elif case == "block_ops":
        # The ring's blocks (one LSE, not a pair), strided, a ragged query block.
        q = torch.randn(2, 37, 4, 128)[:, :, 1:3]
        k, v = torch.randn(2, 45, 2, 128), torch.randn(2, 45, 2, 128)
        out, lse = kernels.triton_block_forward(q, k, v, scale=0.1, causal=False)
        dout = torch.randn_like(out)
        grads = kernels.triton_block_backward(dout, q, k, v, out, lse, scale=0.1, causal=False)
        ref_out, ref_lse = math_block_forward(q, k, v, scale=0.1, causal=False)
        ref_grads = math_block_backward(dout, q, k, v, ref_out, ref_lse, scale=0.1, causal=False)
        for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
            torch.testing.assert_close(g, rg, **TOL, msg=lambda m, name=name: f"d{name}: {m}")
    else:
        monkeypatch.setattr(kernels, "DQ_MODE", "atomic")
        _compare(1, 75, 2, [32, 75], [1, 2], D=128, mask_p=0.2, is_causal=True)


@interpreted
@pytest.mark.parametrize("load_mode", ["pointer", "tma"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [-0.6, 3.0])
def test_scale_of_either_sign(kernels, monkeypatch, is_causal, scale, load_mode) -> None:
    # With descriptor loads the forward takes the row maximum over the unscaled products
    # (negated for a negative scale) and scales it; with pointer loads it scales every
    # score first. A negative scale favours dissimilar keys. Against the oracle, forward,
    # LSE and gradients, with padded keys.
    # Scores are |scale| times larger than at scale 1, and so is their float32 rounding,
    # which the gradients carry (dQ and dK take another factor of the scale): the
    # tolerance grows with |scale| (at 3.0 both the joint and the per-branch kernels
    # were measured up to 9e-5 from a float64 oracle on 12 seeds, 2.9e-5 from the
    # float32 one).
    monkeypatch.setattr(kernels, "LOAD_MODE", load_mode)
    tol = {key: value * max(1.0, abs(scale)) for key, value in TOL.items()}
    _compare(2, 64, 4, [16, 32], [1, 2], mask_p=0.2, scale=scale, is_causal=is_causal, tol=tol)


@interpreted
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "Lq,Lk,causal,kv_heads,scale",
    [(37, 37, True, 3, 0.3), (20, 45, False, 3, 0.3), (45, 20, True, 3, -0.3),
     (30, 30, True, 1, 0.3)],
)  # fmt: skip
def test_block_ops(kernels, Lq, Lk, causal, masked, kv_heads, scale) -> None:
    # Strided token-major blocks (a head slice of a larger tensor), as the ring passes them;
    # a strided key keep mask, as the ring's dilated views of a mask are. kv_heads=1:
    # grouped-query blocks (3 query heads on one K/V head). One negative scale.
    q = torch.randn(3, Lq, 6, 16)[:, :, 1:4]
    k, v = torch.randn(3, Lk, kv_heads, 16), torch.randn(3, Lk, kv_heads, 16)
    keep = (torch.rand(3, 2 * Lk) > 0.3)[:, ::2] if masked else None
    if masked:
        keep[0] = False  # a batch row that sees no key at all
    mk = {"key_keep": keep}
    out, lse = kernels.triton_block_forward(q, k, v, scale=scale, causal=causal, **mk)
    ref_out, ref_lse = math_block_forward(q, k, v, scale=scale, causal=causal, **mk)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], **TOL)
    dout = torch.randn_like(out)
    grads = kernels.triton_block_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, **mk)
    ref_grads = math_block_backward(
        dout, q, k, v, ref_out, ref_lse, scale=scale, causal=causal, **mk
    )
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


def _call(device_type="cuda", dtype=torch.bfloat16, head_dim=64, dropout=False) -> AttentionCall:
    return AttentionCall(
        device_type=device_type,
        dtype=dtype,
        head_dim=head_dim,
        is_causal=False,
        dropout=dropout,
        key_padding_mask=False,
        plan=make_plan([8], [1], 2),
    )


@interpreted
def test_why_not_reasons(monkeypatch) -> None:
    backend = get_backend("triton")
    assert backend.why_not(_call()) == []
    assert backend.why_not(_call(dtype=torch.float16)) == []
    assert backend.why_not(_call(device_type="cpu", dtype=torch.float32)) == []  # interpreter
    cpu_bf16 = backend.why_not(_call(device_type="cpu", dtype=torch.bfloat16))
    assert any("float32 only" in r for r in cpu_bf16)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert any("CUDA" in r for r in backend.why_not(_call(device_type="cpu")))
    assert any("float16/bfloat16" in r for r in backend.why_not(_call(dtype=torch.float32)))
    assert any("head_dim" in r for r in backend.why_not(_call(head_dim=40)))
    assert any("dropout" in r for r in backend.why_not(_call(dropout=True)))


@interpreted
def test_explicit_triton_raises_with_reasons() -> None:
    q = torch.randn(1, 8, 2, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend 'triton' cannot run this call: .*head_dim"):
        dilated_attention(q, q, q, [8], [1], backend="triton")


@interpreted
@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((2, 37, 6, [8, 16, 32], [1, 2, 4]), dict(branch_mixing="head_split")),
        ((1, 20, 2, [16, 8, 2], [5, 4, 1]), dict(branch_mixing="head_split", is_causal=True)),
        ((2, 30, 3, [12], [3]), dict(mask_p=0.3)),  # one branch, r > 1
        # fp32 accumulators: the first launch (r = 2) stores its rows, the rest start at 0
        ((1, 45, 4, [8, 16, 32], [1, 2, 4]), dict(is_causal=True, mask_p=0.3)),
        ((2, 40, 5, [8, 16], [1, 3]), dict(is_causal=True)),
        ((2, 40, 4, [8, 16], [2, 4]), dict()),  # no r = 1 branch: accumulators copied out
        ((1, 33, 4, [8, 16], [1, 2]), dict(kv_heads=2, branch_mixing="head_split")),
    ],
    ids=[
        "head_split",
        "head_split_causal",
        "one_branch_mask",
        "causal_mask",
        "causal_r3",
        "without_r1",
        "gqa",
    ],  # fmt: skip
)
@pytest.mark.filterwarnings("ignore:dilated attention with .* leaves some positions")
def test_unwritten_memory_is_never_read(monkeypatch, args, kwargs) -> None:
    # Every float tensor the backend allocates with torch.empty / empty_like starts as
    # NaN: a row no kernel writes, or an accumulator read before it is written, turns
    # the result (or its gradients) NaN and fails the oracle comparison. (The GPU tests
    # poison the CUDA caching allocator the same way.)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def alloc(*a, **kw):
            t = make(*a, **kw)
            return t.fill_(math.nan) if t.is_floating_point() else t

        return alloc

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    _compare(*args, **kwargs)


@interpreted
def test_head_split_with_fewer_heads_than_branches() -> None:
    # Branches without heads run nothing; the others must still match the oracle.
    _compare(1, 20, 2, [16, 8, 2], [5, 4, 1], branch_mixing="head_split")
    _compare(2, 13, 1, [4, 8], [1, 2], branch_mixing="head_split", is_causal=True)


def _ring_triton_worker(rank: int, world_size: int, cases: list) -> list[dict]:
    # Runs in a spawned gloo process that inherited TRITON_INTERPRET=1 but, not being
    # started by pytest, not conftest's interpreter patch.
    from conftest import patch_triton_interpreter

    from dilated_attention_pytorch import ring_dilated_attention

    patch_triton_interpreter()

    results = []
    for ws, rs, is_causal, mixing, masked, kv_heads in cases:
        torch.manual_seed(0)  # the same full tensors on every rank
        B, N, H, D = 2, 48, 3, 16
        q = torch.randn(B, N, H, D, requires_grad=True)
        k, v = (torch.randn(B, N, kv_heads or H, D, requires_grad=True) for _ in range(2))
        mask = torch.rand(B, N) < 0.3 if masked else None
        kw = dict(is_causal=is_causal, branch_mixing=mixing)
        ref = dilated_attention(q, k, v, ws, rs, backend="pytorch", key_padding_mask=mask, **kw)
        dout = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
        L = N // world_size
        part = slice(rank * L, (rank + 1) * L)
        shards = [t.detach()[:, part].clone().requires_grad_() for t in (q, k, v)]
        local_mask = None if mask is None else mask[:, part]
        out = ring_dilated_attention(
            *shards, ws, rs, backend="triton", key_padding_mask=local_mask, **kw
        )
        grads = torch.autograd.grad(out, shards, dout[:, part])
        errs = [(out - ref[:, part]).abs().max().item()]
        errs += [
            (g - rg[:, part]).abs().max().item() for g, rg in zip(grads, ref_grads, strict=True)
        ]
        results.append(
            {"case": (ws, rs, is_causal, mixing, masked, kv_heads), "max_err": max(errs)}
        )
    return results


@interpreted
def test_ring_with_triton_block_ops() -> None:
    from distributed_utils import spawn

    # Shard L = 24: w = 8 is local, w = 24 fills a shard, w = 48 spans both ranks with
    # L % r != 0, so the ranks' dilated pieces have different lengths (Lq != Lk blocks).
    cases = [
        ([8, 24, 48], [1, 3, 5], False, "softmax", False, None),
        ([8, 24, 48], [1, 3, 5], True, "softmax", True, None),
        ([8, 48], [2, 5], True, "head_split", True, None),
        ([8, 48], [1, 5], True, "softmax", False, 1),  # multi-query: one K/V head travels
    ]
    for rank_results in spawn(_ring_triton_worker, 2, cases):
        for r in rank_results:
            assert r["max_err"] < 2e-5, r  # fp32 dots in the interpreter, as TOL above


@interpreted
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_layer_recomputing_qkv(branch_mixing, kv_heads) -> None:
    """``MultiheadDilatedAttention(recompute_qkv=True)`` on the Triton kernels: its
    backward runs the kernels on parts of the plan (heads_plan: chunks starting at heads
    whose offsets are not 0, the kernels' ``head0``), against the separate nodes."""
    from dilated_attention_pytorch import MultiheadDilatedAttention

    torch.manual_seed(0)
    results = []
    for recompute in (True, False):
        torch.manual_seed(0)
        layer = MultiheadDilatedAttention(
            96, 6, [8, 24], [1, 3], num_kv_heads=kv_heads, branch_mixing=branch_mixing,
            backend="triton", recompute_qkv=recompute,
        )  # fmt: skip
        x = torch.randn(2, 53, 96, requires_grad=True)
        out, _ = layer(x, is_causal=True)
        grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out))
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL)
