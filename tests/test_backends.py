"""Every registered backend against the dense oracle, generated from its declared capabilities.

For each backend in ``available_backends()``, and each (device, dtype) its
``capabilities`` declare, the cases below run with every option the backend declares
(causal, key padding mask, both branch mixings), forward and gradients, against the
float64 dense oracle, within the backend's own per-dtype tolerance. Options it does
not declare must be refused with a reason when asked for by name, and its block ops
(for the ring) are checked against dense attention on one block. A new backend is
tested by registering it: no new test file.

Backends that cannot run on this machine's devices (Triton needs CUDA) are run again
in a subprocess with ``TRITON_INTERPRET=1``, where Triton kernels run on the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from dilated_attention_pytorch import dense_dilated_attention, dilated_attention
from dilated_attention_pytorch.backends import (
    AttentionCall,
    available_backends,
    get_backend,
    select_backend,
)
from dilated_attention_pytorch.oracle import dilated_count_mask
from dilated_attention_pytorch.plan import make_plan

# (B, N, H, segment_lengths, dilation_rates): ragged last segments, r > 1 with
# offsets, more than one branch, a branch wider than the sequence, few heads.
CONFIGS = [
    (2, 37, 4, (8, 16), (1, 2)),
    (1, 48, 3, (4, 16, 64), (1, 2, 4)),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Set in the TRITON_INTERPRET=1 subprocess: only these backends are run there.
ONLY = os.environ.get("DILATED_ATTENTION_TEST_BACKENDS")


def _backends() -> list[str]:
    names = available_backends()
    return [n for n in names if n in ONLY.split(",")] if ONLY else names


def _head_dim(caps) -> int:
    return 16 if caps.head_dims is None or 16 in caps.head_dims else caps.head_dims[0]


def _cases() -> list:
    cases = []
    for name in _backends():
        caps = get_backend(name).capabilities
        for device in (d for d in caps.device_types if d in DEVICES):
            for dtype in caps.dtypes[device]:
                for config in range(len(CONFIGS)):
                    for causal in [False, True] if caps.causal else [False]:
                        for mask in [False, True] if caps.key_padding_mask else [False]:
                            for mixing in ("softmax", "head_split"):
                                dt = str(dtype).removeprefix("torch.")
                                cases.append(
                                    pytest.param(
                                        name, device, dtype, config, causal, mask, mixing,
                                        id=f"{name}-{device}-{dt}-c{config}-causal{int(causal)}"
                                        f"-mask{int(mask)}-{mixing}",
                                    )
                                )  # fmt: skip
    return cases


def _call(name, device, dtype, head_dim, plan, **flags) -> AttentionCall:
    base = dict(is_causal=False, dropout=False, key_padding_mask=False)
    return AttentionCall(device, dtype, head_dim, plan=plan, **{**base, **flags})


@pytest.mark.parametrize(
    ("name", "device", "dtype", "config", "causal", "mask", "mixing"), _cases()
)
def test_backend_matches_oracle(name, device, dtype, config, causal, mask, mixing) -> None:
    backend = get_backend(name)
    B, N, H, ws, rs = CONFIGS[config]
    D = _head_dim(backend.capabilities)
    plan = make_plan(ws, rs, H, mixing)
    why = backend.why_not(_call(name, device, dtype, D, plan, is_causal=causal))
    if why:
        pytest.skip(f"{name} cannot run here: {why}")
    q, k, v = (torch.randn(B, N, H, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    key_padding_mask = None
    if mask:
        key_padding_mask = torch.rand(B, N, device=device) < 0.3
        key_padding_mask[0, : N // 2] = True  # whole segments without keys: rows output 0
    kw = dict(is_causal=causal, branch_mixing=mixing, key_padding_mask=key_padding_mask)
    out, lse = dilated_attention(q, k, v, ws, rs, backend=name, return_lse=True, **kw)
    ref_out, ref_lse = dense_dilated_attention(q, k, v, ws, rs, return_lse=True, **kw)
    atol, rtol = backend.capabilities.tolerances[dtype]
    # The oracle computes in float64 from the same (rounded) inputs and rounds its
    # output to the input dtype once; the tolerance bounds the backend's own error.
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(
        lse[finite].double(), ref_lse[finite], atol=max(atol, 1e-6), rtol=max(rtol, 1e-6)
    )
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    for which, g, rg in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=atol, rtol=rtol, msg=lambda m, w=which: f"d{w}: {m}")


@pytest.mark.parametrize("name", _backends())
def test_undeclared_options_are_refused(name) -> None:
    backend = get_backend(name)
    caps = backend.capabilities
    plan = make_plan([8], [1], 2)
    device = caps.device_types[0]
    call = _call(name, device, caps.dtypes[device][0], _head_dim(caps), plan)
    for flag, supported in (
        ("is_causal", caps.causal),
        ("key_padding_mask", caps.key_padding_mask),
        ("dropout", caps.dropout),
    ):
        reasons = backend.why_not(dataclasses.replace(call, **{flag: True}))
        assert bool(reasons) != supported or backend.why_not(call), (flag, reasons)
    for device_type in ("cpu", "cuda", "mps"):
        if device_type not in caps.device_types:
            reasons = backend.why_not(dataclasses.replace(call, device_type=device_type))
            assert any(device_type in r for r in reasons), reasons
    if caps.head_dims is not None:
        odd = dataclasses.replace(call, head_dim=max(caps.head_dims) + 1)
        assert any("head_dim" in r for r in backend.why_not(odd))


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("causal", [False, True])
def test_block_ops_match_dense_attention(name, causal) -> None:
    backend = get_backend(name)
    caps = backend.capabilities
    if not caps.block_ops:
        assert backend.block_ops() is None
        return
    ops = backend.block_ops()
    device = next((d for d in caps.device_types if d in DEVICES), None)
    D = _head_dim(caps)
    dtype = caps.dtypes[device][0] if device else None
    plan = make_plan([24], [1], 2)
    if device is None or backend.why_not(_call(name, device, dtype, D, plan, is_causal=causal)):
        pytest.skip(f"{name} cannot run its blocks here")
    # Three blocks of 24 queries against 24 keys, two heads: one dense segment each.
    q, k, v = (torch.randn(3, 24, 2, D, device=device).to(dtype) for _ in range(3))
    out, lse = ops.forward(q, k, v, scale=D**-0.5, causal=causal)
    flat = [t.reshape(1, 72, 2, D) for t in (q, k, v)]
    ref_out, ref_lse = dense_dilated_attention(*flat, [24], [1], is_causal=causal, return_lse=True)
    atol, rtol = caps.tolerances[dtype]
    torch.testing.assert_close(out.reshape(1, 72, 2, D).to(dtype), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        lse.reshape(1, 72, 2).double(), ref_lse, atol=max(atol, 1e-6), rtol=max(rtol, 1e-6)
    )
    # Backward given the final out/lse: the gradient of the block's own softmax here.
    dout = torch.randn_like(out)
    grads = ops.backward(dout, q, k, v, out.to(dtype), lse, scale=D**-0.5, causal=causal)
    leaves = [t.detach().requires_grad_() for t in flat]
    ref = dense_dilated_attention(*leaves, [24], [1], is_causal=causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.reshape(1, 72, 2, D).to(dtype))
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.reshape(1, 72, 2, D).to(dtype), rg, atol=atol, rtol=rtol)


def _float32_device(name: str) -> str | None:
    """A device of this process on which ``name`` runs float32 (the scale tests need it)."""
    caps = get_backend(name).capabilities
    return next(
        (d for d in caps.device_types if d in DEVICES and torch.float32 in caps.dtypes[d]), None
    )


def _scaled_error(got, ref, norm) -> float:
    return ((got.double() - ref).abs().max() / norm).item()


# Large logits (inputs scaled by ``logit_scale``). The reachable accuracy is set by
# float32's rounding of the scores, not by the merge: a score of size |S| is rounded by up
# to 2**-24 |S|, which moves a probability by that much relatively, so errors up to a few
# 2**-23 max|S| are inherent (scale 1e2: max|S| ~ 4e4, 2e-2; PyTorch's SDPA on the dense
# version of the inputs is checked against the same bound). From 1e3 on, every row's best
# score leads the next by more than 30 (checked), the softmax is one-hot to exp(-30), and
# the exact answer copies one value row (or averages the branches that share it): float32
# must be exact to roundoff there. Errors are relative to the natural size of each tensor
# (max|v| for out, |dout| |v| |k| * scale for dq, ...).
LOGIT_SCALES = [1.0, 1e2, 1e3, 1e4]


def _logit_tolerance(q, k, logit_scale, causal) -> float:
    D = q.shape[-1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D**-0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    if logit_scale < 1e3:
        return 2e-6 + 4 * 2**-23 * scores.abs().masked_fill(scores.isinf(), 0).max().item()
    top2 = scores.topk(2, dim=-1).values[..., 1:]  # rows with one key have no runner-up
    gaps = scores.topk(2, dim=-1).values[..., :1] - top2
    assert (gaps[torch.isfinite(gaps)] > 30).all(), "inputs not in the one-hot regime"
    return 2e-6


def _logit_errors(fn, q, k, v, ref_fn, D) -> list[float]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ref_fn(*refs)
    ref_grads = torch.autograd.grad(ref, refs, dout.double())
    g, vm = dout.abs().max(), v.abs().max()
    norms = (vm, g * vm * k.abs().max() * D**-0.5, g * vm * q.abs().max() * D**-0.5, g)
    return [
        _scaled_error(a, b, n)
        for a, b, n in zip((out, *grads), (ref, *ref_grads), norms, strict=True)
    ]


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
def test_branches_merge_exactly_at_large_logits(name, causal, logit_scale) -> None:
    # Three branches share their best key (LongNet's nesting): the merged result must be
    # as accurate as one branch. Before the LSE pair, a float32 LSE of ~1e7 dropped the
    # log 2 of the merge and the branches were summed (190% off at 1e4).
    device = _float32_device(name)
    D, N, H, ws, rs = 16, 256, 4, [16, 64, 256], [1, 2, 4]
    plan = make_plan(ws, rs, H)
    if device is None or get_backend(name).why_not(_call(name, device, torch.float32, D, plan)):
        pytest.skip(f"{name} does not run float32 here")
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and logit_scale >= 1e3:
        # The interpreter runs tl.dot with numpy, whose float32 k @ q.T and q @ k.T round
        # differently; at scores of 1e6 that ulp changes P. CUDA's MMA reduces both the
        # same way: tests/gpu/test_numerics_gpu.py checks these scales there.
        pytest.skip("Triton's CPU interpreter rounds transposed dots differently")
    gen = torch.Generator().manual_seed(int(logit_scale) + causal)
    q, k, v = (torch.randn(1, N, H, D, generator=gen).to(device) for _ in range(3))
    q, k = q * logit_scale, k * logit_scale
    tol = _logit_tolerance(q, k, logit_scale, causal)
    for segs, rates in ((ws, rs), ([N], [1])):
        errors = _logit_errors(
            lambda a, b, c, s=segs, r=rates: dilated_attention(
                a, b, c, s, r, is_causal=causal, backend=name
            ),
            q, k, v,
            lambda a, b, c, s=segs, r=rates: dense_dilated_attention(a, b, c, s, r, is_causal=causal),
            D,
        )  # fmt: skip
        assert max(errors) < tol, (segs, errors)
    # The bound is what float32 attention reaches: PyTorch's SDPA on the dense problem.
    sdpa = _logit_errors(
        lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (a, b, c)), is_causal=causal
        ).transpose(1, 2),
        q, k, v,
        lambda a, b, c: dense_dilated_attention(a, b, c, [N], [1], is_causal=causal),
        D,
    )  # fmt: skip
    assert max(sdpa) < tol, sdpa


@pytest.mark.parametrize("name", _backends())
def test_non_finite_values_at_padding_keys_stay_out(name) -> None:
    # NaN / inf in the keys and values of padding tokens must not reach any output row,
    # and the gradients are those of the same call with those values zeroed.
    device = _float32_device(name)
    caps = get_backend(name).capabilities
    B, N, H, D, ws, rs = 2, 64, 4, 16, [8, 32], [1, 2]
    plan = make_plan(ws, rs, H)
    call = _call(name, device, torch.float32, D, plan, key_padding_mask=True)
    if device is None or not caps.key_padding_mask or get_backend(name).why_not(call):
        pytest.skip(f"{name} does not run float32 key padding masks here")
    q, k, v = (torch.randn(B, N, H, D, device=device) for _ in range(3))
    pad = torch.rand(B, N, device=device) < 0.3
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[pad] = float("nan")
    v_bad[pad] = float("nan")
    v_bad[pad & (torch.arange(N, device=device) % 2 == 0)] = float("inf")
    leaves = [t.requires_grad_() for t in (q.clone(), k_bad, v_bad)]
    out = dilated_attention(*leaves, ws, rs, key_padding_mask=pad, backend=name)
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_dilated_attention(*clean, ws, rs, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, clean, dout)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, rg, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("where", ["v", "k"])
def test_non_finite_value_reaches_only_its_readers(name, is_causal, where) -> None:
    # v[:, t] = inf / NaN (or k[:, t] = NaN: an infinite key may give a score of -inf,
    # which weighs 0): exactly the rows that attend token t are non-finite (N = 61: the
    # last segment of each branch is ragged), and every other row's output and dq are
    # those of the same call with finite values there.
    device = _float32_device(name)
    B, N, H, D, ws, rs = 1, 61, 4, 16, [8, 32], [1, 2]
    plan = make_plan(ws, rs, H)
    call = _call(name, device, torch.float32, D, plan, is_causal=is_causal)
    if device is None or get_backend(name).why_not(call):
        pytest.skip(f"{name} does not run this float32 call here")
    q, k, v = (torch.randn(B, N, H, D, device=device) for _ in range(3))
    for t, value in ((15, float("inf")), (40, float("nan")), (60, float("-inf"))):
        bad = {"k": k.clone(), "v": v.clone()}
        bad[where][:, t] = value if where == "v" else float("nan")
        q_leaf = q.clone().requires_grad_()
        out = dilated_attention(
            q_leaf, bad["k"], bad["v"], ws, rs, is_causal=is_causal, backend=name
        )
        readers = dilated_count_mask(N, H, ws, rs, is_causal=is_causal)[:, :, t] > 0  # (H, N)
        non_finite = ~torch.isfinite(out).all(dim=-1)[0].T  # (H, N)
        assert torch.equal(non_finite, readers.to(device)), (t, non_finite.sum(), readers.sum())
        q_ref = q.clone().requires_grad_()
        ref = dense_dilated_attention(q_ref, k, v, ws, rs, is_causal=is_causal)
        others = ~readers.T.to(device)  # (N, H): rows that do not read token t
        torch.testing.assert_close(out[0][others], ref[0][others], atol=2e-5, rtol=2e-5)
        dout = torch.randn_like(out) * others[None, :, :, None]  # gradients through the others
        (dq,) = torch.autograd.grad(out, q_leaf, dout)
        (dq_ref,) = torch.autograd.grad(ref, q_ref, dout)
        torch.testing.assert_close(dq[0][others], dq_ref[0][others], atol=2e-5, rtol=2e-5)


def _not_runnable_here() -> list[str]:
    """Backends whose declared devices include none of this process's devices."""
    return [
        n
        for n in available_backends()
        if not any(d in DEVICES for d in get_backend(n).capabilities.device_types)
    ]


@pytest.mark.skipif(
    ONLY is not None or os.environ.get("TRITON_INTERPRET") == "1"
    or importlib.util.find_spec("triton") is None
    or not _not_runnable_here(),
    reason="no backend needs the Triton interpreter here",
)  # fmt: skip
def test_backends_under_triton_interpreter() -> None:
    # triton.jit decides at import whether to interpret, so these backends can only run
    # on the CPU in a fresh process with TRITON_INTERPRET=1 set before the import.
    from conftest import skip_if_interpreter_runs_separately

    skip_if_interpreter_runs_separately()
    only = ",".join(_not_runnable_here())
    env = {**os.environ, "TRITON_INTERPRET": "1", "DILATED_ATTENTION_TEST_BACKENDS": only}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{res.stdout[-8000:]}\n{res.stderr[-2000:]}"
    )
    assert " passed" in res.stdout and " failed" not in res.stdout


def test_explain_backend_names_the_choice_and_the_reasons() -> None:
    from dilated_attention_pytorch import explain_backend

    q = torch.empty(1, 1, 4, 16)  # CPU float32 (triton only under its interpreter)
    choice = explain_backend(q, [8, 16], [1, 2], is_causal=True)
    call = AttentionCall("cpu", torch.float32, 16, True, False, False, make_plan([8, 16], [1, 2], 4),
                         requires_grad=True)  # fmt: skip
    assert choice.name == select_backend("auto", call).name
    order = sorted(available_backends(), key=lambda n: -get_backend(n).auto_priority(call))
    passed_over = order[: order.index(choice.name)]
    assert [name for name, _ in choice.skipped] == passed_over  # every faster one, with reasons
    for name, reasons in choice.skipped:
        assert list(reasons) == get_backend(name).why_not(call) and reasons
    assert str(choice).startswith(choice.name) and all(n in str(choice) for n in passed_over)
    if "triton" in available_backends() and os.environ.get("TRITON_INTERPRET") != "1":
        assert choice.name == "pytorch" and passed_over == ["triton"]
    assert str(explain_backend(q, [8], [1], backend="pytorch")) == "pytorch"
    mask = torch.zeros(1, 1, dtype=torch.bool)  # the mask itself, as dilated_attention takes
    call_masked = AttentionCall("cpu", torch.float32, 16, False, False, True,
                                make_plan([8], [1], 4), requires_grad=True)  # fmt: skip
    assert explain_backend(q, [8], [1], key_padding_mask=mask).name == (
        select_backend("auto", call_masked).name
    )
    with pytest.raises(TypeError, match="key_padding_mask must be the \\(B, N\\) bool mask"):
        explain_backend(q, [8], [1], key_padding_mask="yes")
    # The errors of dilated_attention itself: ValueError for a wrong shape.
    with pytest.raises(ValueError, match=r"q must have 4 dims \(B, N, H, D\).*got shape \(4, 16\)"):
        explain_backend(torch.empty(4, 16), [8], [1])
    with pytest.raises(TypeError, match=r"q must be a \(B, N, H, D\) torch.Tensor, got list"):
        explain_backend([1.0], [8], [1])
