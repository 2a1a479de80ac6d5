"""``dilated_attention`` (pytorch backend) against the dense oracle."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import dense_dilated_attention, dilated_attention

# (segment_lengths, dilation_rates, num_heads): single and multiple branches, w not a
# multiple of r, r larger than H, segments longer than N.
CONFIGS = [
    ([8], [1], 2),
    ([16], [3], 4),
    ([4, 16, 64], [1, 2, 4], 4),
    ([10, 25], [3, 7], 3),  # w % r != 0, r > H
    ([5, 12, 2000], [1, 5, 11], 5),  # segment longer than every N tested
]
SEQ_LENS = [1, 7, 97, 256, 1000]

# float64: both sides compute in float64; errors are ~1e-15, so 1e-10 only allows roundoff.
# float32: the backend accumulates in float32 against a float64 oracle; softmax/matmul
# roundoff grows like sqrt(#keys) * 6e-8, well under 2e-5 for the <= 2000 keys here.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
}


def _inputs(B: int, N: int, H: int, D: int, dtype: torch.dtype, requires_grad: bool = True):
    return [torch.randn(B, N, H, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _compare(q, k, v, ws, rs, *, dtype, **kwargs) -> None:
    out, lse = dilated_attention(q, k, v, ws, rs, return_lse=True, backend="pytorch", **kwargs)
    ref_out, ref_lse = dense_dilated_attention(q, k, v, ws, rs, return_lse=True, **kwargs)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    # -inf where a query has no key, on both sides.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    # The LSE is returned in float32 for every input dtype: float32 rounding of values
    # of order 1-10 is ~1e-6 relative.
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-6)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("N", SEQ_LENS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"w{c[0]}-r{c[1]}-H{c[2]}")
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
def test_reference_matches_oracle_float64(N, config, is_causal, branch_mixing) -> None:
    ws, rs, H = config
    q, k, v = _inputs(2, N, H, 8, torch.float64)
    _compare(q, k, v, ws, rs, dtype=torch.float64, is_causal=is_causal, branch_mixing=branch_mixing)


@pytest.mark.parametrize("N", [97, 1000])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
def test_reference_matches_oracle_float32(N, is_causal, branch_mixing) -> None:
    q, k, v = _inputs(2, N, 4, 16, torch.float32)
    _compare(
        q,
        k,
        v,
        [32, 64, 256],
        [1, 2, 8],
        dtype=torch.float32,
        is_causal=is_causal,
        branch_mixing=branch_mixing,
    )


@pytest.mark.parametrize("N", [7, 97, 256])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
def test_key_padding_mask_matches_oracle(N, is_causal, branch_mixing) -> None:
    B, H = 3, 4
    q, k, v = _inputs(B, N, H, 8, torch.float64)
    mask = torch.rand(B, N) < 0.3
    mask[1] = True  # a fully padded batch element: every query has no key -> output 0
    mask[2, : N // 2] = True  # with causal, early queries have no key
    _compare(
        q, k, v, [4, 32], [1, 3], dtype=torch.float64, is_causal=is_causal,
        branch_mixing=branch_mixing, key_padding_mask=mask,
    )  # fmt: skip
    out = dilated_attention(q, k, v, [4, 32], [1, 3], key_padding_mask=mask, is_causal=is_causal)
    assert torch.all(out[1] == 0)


def test_custom_scale_matches_oracle() -> None:
    q, k, v = _inputs(1, 50, 2, 8, torch.float64)
    _compare(q, k, v, [10, 25], [1, 5], dtype=torch.float64, scale=0.3)


def test_non_contiguous_inputs() -> None:
    # (B, H, N, D) storage transposed to (B, N, H, D), and a slice of a fused qkv tensor.
    base = torch.randn(2, 3, 40, 8, dtype=torch.float64)
    q = base.transpose(1, 2).requires_grad_()
    qkv = torch.randn(2, 40, 3, 3, 8, dtype=torch.float64)
    k, v = qkv[:, :, 1].requires_grad_(), qkv[:, :, 2].requires_grad_()
    _compare(q, k, v, [8, 20], [1, 4], dtype=torch.float64)


def test_gradcheck_float64() -> None:
    q, k, v = _inputs(1, 11, 3, 4, torch.float64)
    for is_causal, mixing in [(False, "softmax"), (True, "softmax"), (False, "head_split")]:
        fn = lambda q, k, v, c=is_causal, m=mixing: dilated_attention(  # noqa: E731
            q, k, v, [3, 8], [1, 3], is_causal=c, branch_mixing=m
        )
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_gradcheck_with_padding_mask() -> None:
    q, k, v = _inputs(2, 9, 2, 4, torch.float64)
    mask = torch.tensor([[False] * 6 + [True] * 3, [True] * 9])
    fn = lambda q, k, v: dilated_attention(q, k, v, [4, 9], [1, 2], key_padding_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_dropout_zero_is_deterministic_and_dropout_changes_output() -> None:
    q, k, v = _inputs(1, 64, 2, 8, torch.float64, requires_grad=False)
    a = dilated_attention(q, k, v, [16, 64], [1, 4])
    b = dilated_attention(q, k, v, [16, 64], [1, 4], dropout_p=0.0)
    assert torch.equal(a, b)
    c = dilated_attention(q, k, v, [16, 64], [1, 4], dropout_p=0.5)
    assert not torch.allclose(a, c)


def test_dropout_is_unbiased_and_gradients_are_consistent() -> None:
    # E[dropout output] equals the plain output: average many draws.
    q, k, v = _inputs(1, 32, 2, 4, torch.float64, requires_grad=False)
    plain = dilated_attention(q, k, v, [8, 32], [1, 2])
    draws = torch.stack(
        [dilated_attention(q, k, v, [8, 32], [1, 2], dropout_p=0.3) for _ in range(400)]
    )
    # Each draw's entries have std O(1); 400 draws -> standard error ~0.05.
    torch.testing.assert_close(draws.mean(0), plain, atol=0.25, rtol=0)
    # With a fixed seed, the dropout mask is a fixed linear operator on V: the gradient
    # must pass gradcheck when the RNG is reset before every call.
    vv = v.clone().requires_grad_()

    def fn(v_: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1234)
        return dilated_attention(q, k, v_, [8, 32], [1, 2], dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (vv,), eps=1e-6, atol=1e-7)


def _drawn_seed(seed: int) -> int:
    """The dropout seed ``dilated_attention`` draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**62, (1,)).item())


@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_drops_the_entries_of_the_oracle(branch_mixing: str, is_causal: bool) -> None:
    # The dropped entries are a function of (seed, branch, head, positions): the oracle
    # rebuilds them from the definition, so output and gradients match exactly.
    q, k, v = _inputs(2, 97, 5, 8, torch.float64)
    mask = torch.rand(2, 97) < 0.2
    ws, rs = [8, 32, 97], [1, 3, 4]
    kw = dict(is_causal=is_causal, branch_mixing=branch_mixing, key_padding_mask=mask)
    torch.manual_seed(21)
    out = dilated_attention(q, k, v, ws, rs, dropout_p=0.3, backend="pytorch", **kw)
    ref = dense_dilated_attention(
        q, k, v, ws, rs, dropout_p=0.3, dropout_seed=_drawn_seed(21), **kw
    )
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float64])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOLERANCES[torch.float64])
    # About p of the entries are dropped: the output is far from the undropped one.
    plain = dense_dilated_attention(q, k, v, ws, rs, **kw)
    assert (out - plain).abs().max() > 0.1


def test_dropout_masks_do_not_depend_on_tiling(monkeypatch) -> None:
    # The math path cuts large blocks into tiles; the dropped entries stay the same.
    from dilated_attention_pytorch.backends import blocks

    q, k, v = _inputs(1, 64, 2, 8, torch.float64, requires_grad=False)
    torch.manual_seed(3)
    whole = dilated_attention(q, k, v, [64], [1], dropout_p=0.5)
    monkeypatch.setattr(blocks, "max_score_elements", lambda device: 200)  # tiles of a few rows
    torch.manual_seed(3)
    tiled = dilated_attention(q, k, v, [64], [1], dropout_p=0.5)
    torch.testing.assert_close(tiled, whole, atol=1e-12, rtol=1e-12)


def test_dropout_keep_rate_and_independence() -> None:
    from dilated_attention_pytorch.dropout import dropout_keep, token_ids

    ids = token_ids(2, 300, 0, 300, torch.device("cpu"))
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep(p, 5, torch.arange(3), ids, ids).double()
        # 540,000 Bernoulli draws: standard error ~7e-4.
        assert abs(keep.mean().item() - (1 - p)) < 5e-3
    keep = dropout_keep(0.5, 5, torch.arange(3), ids, ids).double() - 0.5
    other = dropout_keep(0.5, 6, torch.arange(3), ids, ids).double() - 0.5
    # Neighbouring keys, neighbouring queries, heads and seeds are uncorrelated.
    for a, b in [
        (keep[..., 1:], keep[..., :-1]),
        (keep[..., 1:, :], keep[..., :-1, :]),
        (keep[:, 1:], keep[:, :-1]),
        (keep, other),
    ]:
        assert abs((4 * a * b).mean().item()) < 1e-2


def test_lse_is_not_differentiable_and_float32() -> None:
    q, k, v = _inputs(1, 16, 2, 8, torch.float32)
    out, lse = dilated_attention(q, k, v, [8], [2], return_lse=True)
    assert lse.shape == (1, 16, 2) and lse.dtype == torch.float32
    assert not lse.requires_grad and out.requires_grad


def test_empty_sequence() -> None:
    q, k, v = _inputs(2, 0, 2, 8, torch.float32)
    out = dilated_attention(q, k, v, [4], [1])
    assert out.shape == (2, 0, 2, 8)


def test_half_precision_on_cpu_matches_float32() -> None:
    q, k, v = _inputs(1, 64, 2, 16, torch.float32, requires_grad=False)
    ref = dense_dilated_attention(q, k, v, [16, 64], [1, 4])
    for dtype in (torch.bfloat16, torch.float16):
        out = dilated_attention(q.to(dtype), k.to(dtype), v.to(dtype), [16, 64], [1, 4])
        pt = dense_dilated_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), [16, 64], [1, 4], upcast=False
        )
        # flash-attn's rule: error at most twice that of the oracle run in the same dtype (+eps).
        assert (out.float() - ref).abs().max() <= 2 * (pt.float() - ref).abs().max() + 1e-3


@pytest.mark.parametrize("is_causal", [False, True])
def test_math_path_tiles_long_segments_by_query_rows(monkeypatch, is_causal) -> None:
    # With a tiny score budget every block is cut into query-row tiles (the path that
    # keeps long, barely dilated segments O(N) in memory); results must not change.
    from dilated_attention_pytorch.backends import blocks

    monkeypatch.setattr(blocks, "max_score_elements", lambda device: 40)
    q, k, v = _inputs(2, 61, 3, 8, torch.float64)
    mask = torch.rand(2, 61) < 0.2
    _compare(
        q, k, v, [61, 16], [2, 1], dtype=torch.float64, is_causal=is_causal, key_padding_mask=mask
    )
    assert len(blocks._tiles(1, 31, 2, 31, 40)) > 1  # the budget really forced row tiles
