"""Autograd beyond the first gradient: ``torch.func`` transforms and double backward."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import dense_dilated_attention, dilated_attention
from dilated_attention_pytorch.sparse import block_sparse_attention, make_block_sparse_pattern

WS, RS = [8, 16], [1, 2]


def _qkv(*shape, requires_grad=True):
    return [torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("mask", [False, True])
def test_vmap_joins_the_batch(mask) -> None:
    # vmap over a leading dimension equals a loop over it, forward and gradients; a
    # dimension mapped for q only broadcasts k and v, and the padding mask follows.
    q, k, v = _qkv(3, 2, 32, 4, 16)
    kpm = (torch.rand(2, 32) < 0.3) if mask else None
    fn = lambda a, b, c: dilated_attention(a, b, c, WS, RS, key_padding_mask=kpm)  # noqa: E731
    ref_fn = lambda a, b, c: dense_dilated_attention(a, b, c, WS, RS, key_padding_mask=kpm)  # noqa: E731
    out = torch.func.vmap(fn)(q, k, v)
    ref = torch.stack([ref_fn(q[i], k[i], v[i]) for i in range(3)])
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    for g, rg in zip(
        torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
    ):
        torch.testing.assert_close(g, rg)
    out = torch.func.vmap(fn, in_dims=(0, None, None))(q, k[0], v[0])
    ref = torch.stack([ref_fn(q[i], k[0], v[0]) for i in range(3)])
    torch.testing.assert_close(out, ref)


def test_func_grad_is_first_order_and_works() -> None:
    q, k, v = _qkv(2, 32, 4, 16, requires_grad=False)
    grad = torch.func.grad(lambda a: dilated_attention(a, k, v, WS, RS).square().sum())(q)
    leaf = q.clone().requires_grad_()
    (ref,) = torch.autograd.grad(dense_dilated_attention(leaf, k, v, WS, RS).square().sum(), leaf)
    torch.testing.assert_close(grad, ref)


def _double_backward(fn, q) -> None:
    (g,) = torch.autograd.grad(fn(q).sum(), q, create_graph=True)
    assert g.requires_grad  # not silently detached
    with pytest.raises(RuntimeError, match="does not support double backward") as info:
        g.square().sum().backward()
    assert "dense_dilated_attention" in str(info.value)


def test_gradient_penalty_raises_instead_of_being_dropped() -> None:
    q, k, v = _qkv(2, 32, 4, 16)
    _double_backward(lambda a: dilated_attention(a, k, v, WS, RS), q)
    # Without create_graph nothing changes: the gradient has no graph, as usual.
    (g,) = torch.autograd.grad(dilated_attention(q, k, v, WS, RS).sum(), q)
    assert not g.requires_grad


def test_block_sparse_gradient_penalty_raises() -> None:
    q, k, v = _qkv(1, 64, 2, 16)
    pattern = make_block_sparse_pattern("local_window", 64, block_size=16, sparsity_ratio=0.5)
    _double_backward(lambda a: block_sparse_attention(a, k, v, pattern, backend="pytorch"), q)
