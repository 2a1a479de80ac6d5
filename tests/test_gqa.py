"""Grouped-query and multi-query attention: k, v with ``H_kv`` heads dividing ``H``.

Query head ``h`` reads K/V head ``h // (H / H_kv)`` and keeps its offsets ``h mod r``. The
dense oracle implements that definition by repeating K/V heads; every other path must
match it (float64: 1e-10, as in tests/test_functional.py) without repeating them.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dilated_attention_pytorch import (
    DilatedAttention,
    MultiheadDilatedAttention,
    dense_dilated_attention,
    dilated_attention,
)
from dilated_attention_pytorch.backends.pytorch import PyTorchBackend
from dilated_attention_pytorch.decoding import DilatedKVCache, cached_dilated_attention
from dilated_attention_pytorch.memory import get_memory_estimate
from dilated_attention_pytorch.plan import make_plan

TOL = dict(atol=1e-10, rtol=1e-10)

# (H, H_kv, segment_lengths, dilation_rates, branch_mixing): r % (H/H_kv) == 0,
# (H/H_kv) % r == 0, neither, multi-query, head_split with groups that straddle K/V heads.
CONFIGS = [
    (8, 4, (4, 8, 16), (1, 2, 4), "softmax"),
    (8, 2, (6, 12), (3, 6), "softmax"),
    (6, 2, (8, 16), (4, 2), "softmax"),
    (4, 1, (4, 8), (1, 2), "softmax"),
    (9, 3, (4, 8, 16), (1, 2, 4), "head_split"),
    (6, 3, (8, 16), (1, 3), "head_split"),
]


def _qkv(B, N, H, H_kv, D=8, dtype=torch.float64):
    q = torch.randn(B, N, H, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, N, H_kv, D, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v


def _check_against_oracle(q, k, v, ws, rs, backend="pytorch", **kwargs) -> None:
    out, lse = dilated_attention(q, k, v, ws, rs, backend=backend, return_lse=True, **kwargs)
    ref_kwargs = {key: val for key, val in kwargs.items() if key != "dropout_p"}
    ref, ref_lse = dense_dilated_attention(q, k, v, ws, rs, return_lse=True, **ref_kwargs)
    torch.testing.assert_close(out, ref, **TOL)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite].float())
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert g.shape == rg.shape
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"H{c[0]}-Hkv{c[1]}-r{c[3]}-{c[4]}")
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_the_oracle(config, is_causal) -> None:
    H, H_kv, ws, rs, mixing = config
    torch.manual_seed(H * 100 + H_kv + is_causal)
    q, k, v = _qkv(2, 37, H, H_kv)
    mask = torch.rand(2, 37) < 0.2
    for key_padding_mask in (None, mask):
        _check_against_oracle(
            q, k, v, ws, rs, is_causal=is_causal, branch_mixing=mixing,
            key_padding_mask=key_padding_mask,
        )  # fmt: skip


def test_no_key_or_value_head_is_repeated(monkeypatch) -> None:
    # The math path folds the query heads of a K/V head into its rows: repeating K/V
    # (repeat_interleave, expand + reshape of k, v) is not how it works. Forbid the usual
    # ways and check that the result is still the oracle's.
    torch.manual_seed(0)
    q, k, v = _qkv(1, 40, 8, 2)
    ref = dense_dilated_attention(q, k, v, [8, 20], [1, 4], is_causal=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a K/V head was repeated")

    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch.Tensor, "expand", refuse)
    out = dilated_attention(
        q, k, v, [8, 20], [1, 4], is_causal=True, backend=PyTorchBackend(kernel="math")
    )
    grads = torch.autograd.grad(out.sum(), (k, v))
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, **TOL)
    ref_grads = torch.autograd.grad(ref.sum(), (k, v))
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL)


def test_dropout_drops_the_entries_of_multi_head_attention() -> None:
    # Dropout is keyed by (branch, query head, positions): with K/V heads repeated by hand
    # the call is multi-head attention with the same dropped entries.
    torch.manual_seed(1)
    q, k, v = _qkv(1, 32, 6, 2)
    k_rep, v_rep = (t.detach().repeat_interleave(3, dim=2).requires_grad_() for t in (k, v))
    kwargs = dict(is_causal=True, dropout_p=0.3, backend="pytorch")
    torch.manual_seed(7)
    out = dilated_attention(q, k, v, [8, 16], [1, 2], **kwargs)
    torch.manual_seed(7)
    ref = dilated_attention(q, k_rep, v_rep, [8, 16], [1, 2], **kwargs)
    torch.testing.assert_close(out, ref, **TOL)
    dout = torch.randn_like(out)
    dk, dv = torch.autograd.grad(out, (k, v), dout)
    dk_rep, dv_rep = torch.autograd.grad(ref, (k_rep, v_rep), dout)
    torch.testing.assert_close(dk, dk_rep.view(1, 32, 2, 3, 8).sum(3), **TOL)
    torch.testing.assert_close(dv, dv_rep.view(1, 32, 2, 3, 8).sum(3), **TOL)


@pytest.mark.parametrize("mixing", ["softmax", "head_split"])
def test_plan_reads_every_query_heads_kv_head_once(mixing) -> None:
    for H, H_kv, rs in itertools.product((4, 6, 8, 12), (1, 2, 3, 4), ((1,), (2, 3), (1, 4, 6))):
        if H % H_kv:
            continue
        ws = tuple(16 * (i + 1) for i in range(len(rs)))
        plan = make_plan(ws, rs, H, mixing, H_kv)
        mha = make_plan(ws, rs, H, mixing)
        for branch, ref in zip(plan.branches, mha.branches, strict=True):
            read = {}
            for g in branch.head_groups:
                assert len(g.heads) == g.num_kv_heads * g.kv_share
                for i, h in enumerate(g.heads):
                    assert h not in read
                    read[h] = (g.offset, g.kv_heads[i // g.kv_share])
            # The same heads and offsets as multi-head attention, each on K/V head h // g.
            want = {h: (o, h // (H // H_kv)) for o_g in ref.head_groups for h, o in
                    ((h, o_g.offset) for h in o_g.heads)}  # fmt: skip
            assert read == want
            assert branch.offsets_used == ref.offsets_used


def test_bad_num_kv_heads() -> None:
    with pytest.raises(ValueError, match=r"num_kv_heads must divide num_heads \(8\).*got 3"):
        MultiheadDilatedAttention(64, 8, [8], [1], num_kv_heads=3)
    with pytest.raises(TypeError, match="num_kv_heads must be a positive int"):
        MultiheadDilatedAttention(64, 8, [8], [1], num_kv_heads=2.0)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        make_plan([8], [1], 8, "softmax", 0)


def test_multihead_layer_with_fewer_kv_heads() -> None:
    torch.manual_seed(2)
    E, H, H_kv, D = 48, 6, 2, 8
    layer = MultiheadDilatedAttention(
        E, H, [8, 16], [1, 2], num_kv_heads=H_kv, layer_norm=False, dtype=torch.float64
    )
    assert layer.k_proj.weight.shape == (H_kv * D, E) == layer.v_proj.weight.shape
    assert "num_kv_heads=2" in repr(layer)
    x = torch.randn(2, 32, E, dtype=torch.float64)
    out, _ = layer(x, is_causal=True)
    q = layer.q_proj(x).view(2, 32, H, D)
    k = layer.k_proj(x).view(2, 32, H_kv, D)
    v = layer.v_proj(x).view(2, 32, H_kv, D)
    ref = dense_dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True)
    torch.testing.assert_close(out, layer.out_proj(ref.reshape(2, 32, E)), **TOL)
    with pytest.raises(ValueError, match="layer_norm=False"):
        layer.get_memory_estimate(32)
    # The default layer's estimate counts k, v, k_proj and v_proj with its K/V heads.
    normed = MultiheadDilatedAttention(E, H, [8, 16], [1, 2], num_kv_heads=H_kv, backend="pytorch")
    est = normed.get_memory_estimate(32)
    assert est["num_kv_heads"] == H_kv
    assert est == get_memory_estimate(
        32, 1, H, D, segment_lengths=[8, 16], dilation_rates=[1, 2], embed_dim=E,
        num_kv_heads=H_kv, dtype=torch.float32, backend="pytorch",
    )  # fmt: skip
    with pytest.raises(TypeError, match="num_kv_heads is this layer's own"):
        normed.get_memory_estimate(32, num_kv_heads=H)


def test_decoding_cache_with_kv_heads() -> None:
    torch.manual_seed(3)
    H, H_kv, ws, rs = 6, 2, [4, 8], [1, 4]
    q, k, v = (t.detach() for t in _qkv(1, 21, H, H_kv))
    full = dense_dilated_attention(q, k, v, ws, rs, is_causal=True)
    attn = DilatedAttention(ws, rs)
    cache = attn.new_cache(H, num_kv_heads=H_kv)
    assert isinstance(cache, DilatedKVCache)
    # Per branch, one column per head group and K/V head, once per offset used.
    assert [t.shape[2] for t in cache.keys] == []  # allocated at the first call
    with torch.no_grad():
        parts = [attn(q[:, :9], k[:, :9], v[:, :9], True, cache=cache)]
        parts += [cached_dilated_attention(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], cache)
                  for t in range(9, 21)]  # fmt: skip
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)
    # r=1: 2 K/V heads; r=4: (offset, K/V head) pairs (0,0) (0,1) (1,0) (1,1) (2,0) (3,1).
    assert [t.shape[2] for t in cache.keys] == [2, 6]
    with pytest.raises(ValueError, match="built for 6 query and 2 K/V heads"):
        cached_dilated_attention(q[:, :1], q[:, :1], q[:, :1], cache)


def test_fused_ops_run_once_per_query_head_of_a_run_without_kv_copies() -> None:
    # The cuDNN/flash ops need as many K/V heads as query heads: blocks.py calls them on
    # strided views of the query heads, all K/V heads in place. The CPU stands in the math
    # block (which asserts equal head counts here) for the fused op.
    from dilated_attention_pytorch.backends import blocks

    def fused_forward(q, k, v, *, scale, causal):
        assert q.shape[2] == k.shape[2]
        return blocks.math_block_forward(q, k, v, scale=scale, causal=causal)

    def fused_backward(dout, q, k, v, out, lse, *, scale, causal):
        assert q.shape[2] == k.shape[2]
        return blocks.math_block_backward(dout, q, k, v, out, lse, scale=scale, causal=causal)

    torch.manual_seed(4)
    q = torch.randn(3, 9, 6, 8, dtype=torch.float64)
    k, v = (
        torch.randn(3, 11, 2, 8, dtype=torch.float64),
        torch.randn(3, 11, 2, 8, dtype=torch.float64),
    )
    kw = dict(scale=0.3, causal=True)
    out, lse = blocks.fused_grouped_forward(fused_forward, q, k, v, **kw)
    ref_out, ref_lse = blocks.math_block_forward(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    dout = torch.randn_like(out)
    grads = blocks.fused_grouped_backward(fused_backward, dout, q, k, v, out, lse, **kw)
    ref_grads = blocks.math_block_backward(dout, q, k, v, ref_out, ref_lse, **kw)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL)


def test_block_sparse_attention_with_fewer_kv_heads() -> None:
    from dilated_attention_pytorch import (
        BlockSparseAttention,
        RingBlockSparseAttention,
        block_sparse_attention,
        create_block_sparse_attention,
        make_block_sparse_pattern,
    )

    q, k, v = (t.detach().requires_grad_() for t in _qkv(1, 32, 4, 2))
    pattern = make_block_sparse_pattern("local_window", 32, block_size=16)
    out = block_sparse_attention(q, k, v, pattern)
    # The same as repeating each K/V head for its query heads (gradients summed).
    kr, vr = (t.detach().repeat_interleave(2, dim=2).requires_grad_() for t in (k, v))
    ref = block_sparse_attention(q.detach(), kr, vr, pattern)
    torch.testing.assert_close(out, ref, **TOL)
    dout = torch.randn_like(out)
    dk, dv = torch.autograd.grad(out, (k, v), dout)
    rdk, rdv = torch.autograd.grad(ref, (kr, vr), dout)
    torch.testing.assert_close(dk, rdk.unflatten(2, (2, 2)).sum(3), **TOL)
    torch.testing.assert_close(dv, rdv.unflatten(2, (2, 2)).sum(3), **TOL)
    layer = MultiheadDilatedAttention(
        32, 4, num_kv_heads=2, attention=BlockSparseAttention(block_size=16, sparsity_ratio=0.5)
    )
    y, _ = layer(torch.randn(1, 32, 32))
    assert y.shape == (1, 32, 32)
    made = create_block_sparse_attention(32, 4, 0.5, "local_window", 16, num_kv_heads=2)
    assert made.num_kv_heads == 2 and made.k_proj.weight.shape == (16, 32)
    # The ring module without a process group runs on this device (rings of several
    # ranks: tests/test_block_sparse_ring.py).
    ring = RingBlockSparseAttention(block_size=16, sparsity_ratio=0.5)
    torch.testing.assert_close(ring(q, k, v), layer.attention(q, k, v), **TOL)


def _repeat_kv_projections(gqa: torch.nn.Module, mha: torch.nn.Module, group: int, D: int) -> None:
    """Load ``gqa``'s weights into ``mha`` with each K/V head's projection rows repeated for
    its ``group`` query heads: the two layers then compute the same function."""
    state = dict(gqa.state_dict())
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        t = state[name]
        state[name] = t.view(-1, D, *t.shape[1:]).repeat_interleave(group, 0).flatten(0, 1)
    mha.load_state_dict(state)


def test_enterprise_and_hilbert_layers_take_num_kv_heads() -> None:
    from dilated_attention_pytorch import EnterpriseDistributedDilatedAttention
    from dilated_attention_pytorch.ring import HilbertRingMultiheadAttention

    torch.manual_seed(5)
    x = torch.randn(1, 64, 32, dtype=torch.float64)
    kw = dict(dtype=torch.float64)
    layers = [
        (EnterpriseDistributedDilatedAttention, dict(use_checkpointing=True)),
        (HilbertRingMultiheadAttention, dict(grid_size=(8, 8))),
    ]
    for cls, extra in layers:
        gqa = cls(32, 4, [16, 32], [1, 2], num_kv_heads=2, **extra, **kw)
        mha = cls(32, 4, [16, 32], [1, 2], **extra, **kw)
        assert gqa.k_proj.weight.shape == (16, 32)
        _repeat_kv_projections(gqa, mha, group=2, D=8)
        torch.testing.assert_close(gqa(x)[0], mha(x)[0], **TOL, msg=cls.__name__)


def test_config_and_factory_take_num_kv_heads() -> None:
    from dilated_attention_pytorch import DilatedAttentionConfig, create_multihead_dilated_attention

    cfg = DilatedAttentionConfig(
        segment_lengths=[16, 32], dilation_rates=[1, 2], embed_dim=64, num_heads=8, num_kv_heads=2
    )
    for kind in ("multihead_dilated", "multihead_enterprise_distributed"):
        layer = create_multihead_dilated_attention(kind, config=cfg)
        assert layer.num_kv_heads == 2 and layer.k_proj.weight.shape == (16, 64), kind
    with pytest.raises(ValueError, match="set embed_dim and num_heads too"):
        DilatedAttentionConfig(segment_lengths=[16], dilation_rates=[1], num_kv_heads=2)
    with pytest.raises(ValueError, match=r"num_kv_heads must divide num_heads \(8\)"):
        cfg.replace(num_kv_heads=3)
