"""Block-sparse attention on one device against a dense softmax masked by the pattern."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import warnings

import pytest
import torch

from dilated_attention_pytorch import (
    BlockSparseAttention,
    MultiheadDilatedAttention,
    RingBlockSparseAttention,
    block_sparse_attention,
    create_block_sparse_attention,
    create_ring_attention,
    make_block_sparse_pattern,
)
from dilated_attention_pytorch.dropout import dropout_keep, token_ids
from dilated_attention_pytorch.sparse import (
    PATTERN_TYPES,
    block_sparse_memory_estimate,
    kv_block_lists,
    pattern_from_block_mask,
)

# float64 on both sides: only summation order differs, so 1e-10 is far above rounding.
TOL = {"atol": 1e-10, "rtol": 1e-10}


def masked_dense(q, k, v, token_mask, *, scale=None, keep=None, p=0.0):
    """Softmax over the allowed keys, written from the definition; O(N^2). k, v with fewer
    heads (grouped-query): each K/V head repeated for its query heads (autograd sums
    their gradients)."""
    B, N, H, D = q.shape
    k, v = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (D**-0.5 if scale is None else scale)
    mask = token_mask if token_mask.dim() == 3 else token_mask[None]
    s = s.masked_fill(~mask[None], -math.inf)
    probs = torch.softmax(s, dim=-1)
    if keep is not None:
        probs = probs * keep / (1.0 - p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _inputs(B, N, H, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=gen, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("pattern_type", PATTERN_TYPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(("N", "block_size"), [(256, 32), (203, 16), (40, 64)])
def test_matches_masked_dense_attention(pattern_type, is_causal, N, block_size) -> None:
    q, k, v, dout = _inputs(2, N, 3, 8, seed=N)
    heads = 3 if pattern_type == "random" else None
    pattern = make_block_sparse_pattern(
        pattern_type, N, block_size=block_size, sparsity_ratio=0.6, is_causal=is_causal,
        num_heads=heads,
    )  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, pattern)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = masked_dense(*ref_leaves, pattern.token_mask())
    torch.testing.assert_close(out, ref, **TOL)
    for g, rg in zip(
        torch.autograd.grad(out, leaves, dout),
        torch.autograd.grad(ref, ref_leaves, dout),
        strict=True,
    ):
        torch.testing.assert_close(g, rg, **TOL)


@pytest.mark.parametrize(
    ("pattern_type", "H_kv"),
    [("local_window", 1), ("random", 2), ("dilated_sparse", 2), ("global_local", 3)],
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_grouped_query_matches_masked_dense_attention(pattern_type, H_kv, is_causal) -> None:
    # k, v with fewer heads: query head h reads K/V head h // (H / H_kv); the reference
    # repeats the K/V heads (its autograd sums their gradients over each group).
    H, N, bs = 6, 203, 16
    gen = torch.Generator().manual_seed(H_kv + 10 * is_causal)
    q, dout = (torch.randn(2, N, H, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, N, H_kv, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    pattern = make_block_sparse_pattern(
        pattern_type, N, block_size=bs, sparsity_ratio=0.6, is_causal=is_causal,
        num_heads=H if pattern_type == "random" else None,
    )  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, pattern, backend="pytorch")
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = masked_dense(*ref_leaves, pattern.token_mask())
    torch.testing.assert_close(out, ref, **TOL)
    grads = torch.autograd.grad(out, leaves, dout)
    for g_, rg in zip(grads, torch.autograd.grad(ref, ref_leaves, dout), strict=True):
        assert g_.shape == rg.shape
        torch.testing.assert_close(g_, rg, **TOL)


def test_dropout_drops_the_hashed_entries_and_replays_them() -> None:
    N, H = 96, 2
    q, k, v, dout = _inputs(2, N, H, 8, seed=3)
    pattern = make_block_sparse_pattern("local_window", N, block_size=16, window=1)
    torch.manual_seed(9)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    ids = token_ids(2, N, 0, N, torch.device("cpu"))
    keep = dropout_keep(0.3, seed, torch.arange(H), ids, ids)  # (B, H, N, N)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(9)
    out = block_sparse_attention(*leaves, pattern, dropout_p=0.3)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = masked_dense(*ref_leaves, pattern.token_mask(), keep=keep.double(), p=0.3)
    torch.testing.assert_close(out, ref, **TOL)
    for g, rg in zip(
        torch.autograd.grad(out, leaves, dout),
        torch.autograd.grad(ref, ref_leaves, dout),
        strict=True,
    ):
        torch.testing.assert_close(g, rg, **TOL)


@pytest.mark.parametrize("pattern_type", PATTERN_TYPES)
def test_no_empty_row_and_sparsity_close_to_requested(pattern_type) -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        N = int(torch.randint(16, 3000, (1,), generator=gen))
        bs = int(torch.randint(4, 128, (1,), generator=gen))
        ratio = float(torch.rand(1, generator=gen)) * 0.98
        causal = bool(trial % 2)
        pattern = make_block_sparse_pattern(
            pattern_type, N, block_size=bs, sparsity_ratio=ratio, is_causal=causal, seed=trial
        )
        mask = pattern.block_mask
        nb = math.ceil(N / bs)
        assert mask.shape[-2:] == (nb, nb)
        assert torch.diagonal(mask, dim1=-2, dim2=-1).all()  # every row keeps its diagonal
        if causal:
            assert not torch.triu(mask, diagonal=1).any()
        # The achieved ratio is what the mask holds.
        allowed = nb * (nb + 1) // 2 if causal else nb * nb
        assert pattern.sparsity_ratio == pytest.approx(1 - mask.sum().item() / allowed)
        assert pattern.requested_ratio == ratio
    # Where the grid is fine enough, the knob search lands close to the request.
    for ratio in (0.5, 0.9, 0.97):
        pattern = make_block_sparse_pattern(
            pattern_type, 65536, block_size=64, sparsity_ratio=ratio
        )
        assert abs(pattern.sparsity_ratio - ratio) < 0.05, pattern.knobs


def test_dropped_blocks_are_never_read() -> None:
    # NaN in every key/value block the pattern drops must not reach the output.
    N, bs = 128, 16
    q, k, v, _ = _inputs(1, N, 2, 8)
    pattern = make_block_sparse_pattern("local_window", N, block_size=bs, window=0)
    k[:, 16:32] = math.nan  # block 1: kept only by query block 1
    v[:, 16:32] = math.nan
    out = block_sparse_attention(q, k, v, pattern)
    assert torch.isfinite(out[:, :16]).all() and torch.isfinite(out[:, 32:]).all()


def test_kv_block_lists_layout() -> None:
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    num, idx = kv_block_lists(mask)
    assert num.tolist() == [2, 1, 3]
    assert idx.tolist() == [[0, 2, 0], [1, 0, 0], [0, 1, 2]]


def test_pattern_mask_mod_and_custom_block_mask() -> None:
    pattern = make_block_sparse_pattern(
        "global_local", 100, block_size=10, window=1, is_causal=True
    )
    q_idx, kv_idx = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(pattern.mask_mod(zero, zero, q_idx, kv_idx), pattern.token_mask())
    custom = torch.zeros(4, 4, dtype=torch.bool)
    custom[3, 0] = True
    wrapped = pattern_from_block_mask(custom, 60, 15)  # a bare mask: blocks of ceil(60 / 4)
    assert torch.diagonal(wrapped.block_mask).all() and wrapped.block_mask[3, 0]
    q, k, v, _ = _inputs(1, 60, 2, 8)
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, custom), masked_dense(q, k, v, wrapped.token_mask()), **TOL
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: make_block_sparse_pattern("stripes", 64), ValueError,
         r"unknown pattern_type 'stripes'; choose one of \['local_window', 'dilated_sparse', 'global_local', 'random'\]"),
        (lambda: make_block_sparse_pattern("random", 64, sparsity_ratio=1.0), ValueError,
         r"sparsity_ratio must be in \[0, 1\)"),
        (lambda: make_block_sparse_pattern("random", 64, sparsity_ratio=-0.1), ValueError,
         r"sparsity_ratio must be in \[0, 1\)"),
        (lambda: make_block_sparse_pattern("random", 64, block_size=0), ValueError,
         r"block_size must be a positive int, got 0"),
        (lambda: make_block_sparse_pattern("local_window", 64, window=2, sparsity_ratio=0.5),
         ValueError, r"pass either sparsity_ratio or window="),
        (lambda: make_block_sparse_pattern("local_window", 64, scale=2), ValueError,
         r"pattern 'local_window' takes the knobs \['window'\], got \['scale'\]"),
        (lambda: make_block_sparse_pattern("dilated_sparse", 64, scale=float("nan")), ValueError,
         r"scale=nan is not valid: .* scale a finite positive number"),
        (lambda: make_block_sparse_pattern("dilated_sparse", 64, scale=float("inf")), ValueError,
         r"scale=inf is not valid"),
        (lambda: make_block_sparse_pattern("local_window", 64, window=True), ValueError,
         r"window=True is not valid: window is an int >= 0"),
        (lambda: make_block_sparse_pattern("random", 64, density=True), ValueError,
         r"density=True is not valid"),
        (lambda: make_block_sparse_pattern("random", 64, seed=1.5), TypeError,
         r"seed must be an int \(the random pattern's generator seed\), got float 1.5"),
        (lambda: make_block_sparse_pattern("random", 64, seed=2**64), ValueError,
         r"seed must be in \[0, 2\*\*63\), got 18446744073709551616"),
        (lambda: pattern_from_block_mask(torch.ones(3, 3, dtype=torch.bool), 64, 16), ValueError,
         r"the block mask must have shape \(4, 4\) or \(H, 4, 4\) for 64 tokens in blocks of 16"),
        (lambda: BlockSparseAttention(pattern_type="local_window", segment_lengths=[64],
                                      dilation_rates=[1]), ValueError,
         r"segment_lengths and dilation_rates shape the 'dilated_sparse' pattern only"),
    ],
)  # fmt: skip
def test_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("segments", [None, ([16, 32], [1, 2])])
def test_extreme_dilated_sparse_scales(segments) -> None:
    # A huge scale keeps every block (one segment holds them all); a tiny one only the
    # diagonal. Neither overflows, and reported segments never exceed the block count.
    kw = {} if segments is None else dict(segment_lengths=segments[0], dilation_rates=segments[1])
    huge = make_block_sparse_pattern("dilated_sparse", 64, block_size=8, scale=1e20, **kw)
    tiny = make_block_sparse_pattern("dilated_sparse", 64, block_size=8, scale=1e-300, **kw)
    assert huge.block_mask.all()
    assert torch.equal(tiny.block_mask, torch.eye(8, dtype=torch.bool))
    for pattern in (huge, tiny):
        assert all(1 <= w <= 8 for w, _ in pattern.knobs["branches_in_blocks"])


def test_numpy_integer_segments() -> None:
    np = pytest.importorskip("numpy")
    layer = BlockSparseAttention(
        16, 0.5, "dilated_sparse", segment_lengths=list(np.array([32, 64])),
        dilation_rates=list(np.array([1, 2])),
    )  # fmt: skip
    plain = BlockSparseAttention(
        16, 0.5, "dilated_sparse", segment_lengths=[32, 64], dilation_rates=[1, 2]
    )
    assert layer.op_spec == plain.op_spec
    assert torch.equal(layer.pattern(128).block_mask, plain.pattern(128).block_mask)


def test_call_errors() -> None:
    q = torch.randn(1, 64, 2, 8)
    pattern = make_block_sparse_pattern("local_window", 64, block_size=16)
    with pytest.raises(ValueError, match=r"built for 64 tokens but q has 32"):
        block_sparse_attention(q[:, :32], q[:, :32], q[:, :32], pattern)
    with pytest.raises(
        ValueError, match=r"built with is_causal=False but the call has is_causal=True"
    ):
        block_sparse_attention(q, q, q, pattern, is_causal=True)
    per_head = make_block_sparse_pattern("random", 64, block_size=16, num_heads=3)
    with pytest.raises(ValueError, match=r"one block mask per head for 3 heads, but q has 2"):
        block_sparse_attention(q, q, q, per_head)
    with pytest.raises(ValueError, match=r"key_padding_mask is not supported by block-sparse"):
        BlockSparseAttention()(q, q, q, key_padding_mask=torch.zeros(1, 64, dtype=torch.bool))


def test_modules_factory_and_deprecated_name() -> None:
    torch.manual_seed(0)
    layer = create_block_sparse_attention(
        embed_dim=64, num_heads=4, sparsity_ratio=0.5, pattern_type="dilated_sparse",
        block_size=8,
    )  # fmt: skip
    assert isinstance(layer, MultiheadDilatedAttention)
    assert isinstance(layer.attention, BlockSparseAttention)
    x = torch.randn(2, 100, 64)
    y, _ = layer(x, is_causal=True)
    # The layer's attention is exactly block_sparse_attention on its projections.
    q, k, v = (p(x).view(2, 100, 4, 16) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    att = block_sparse_attention(q, k, v, layer.attention.pattern(100, True))
    want = layer.out_proj(layer.norm(att.reshape(2, 100, 64)))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # The specification's calls run as written.
    create_block_sparse_attention(embed_dim=768, num_heads=12, sparsity_ratio=0.1,
                                  pattern_type="dilated_sparse")  # fmt: skip
    ring = RingBlockSparseAttention(
        segment_lengths=[2048, 4096], dilation_rates=[1, 2], sparsity_ratio=0.9,
        pattern_type="dilated_sparse",
    )  # fmt: skip
    pattern = ring.pattern(65536)
    assert abs(pattern.sparsity_ratio - 0.9) < 0.03
    assert [r for _, r in pattern.knobs["branches_in_blocks"]] == [1, 2]
    assert isinstance(create_ring_attention("block_sparse", sparsity_ratio=0.5),
                      RingBlockSparseAttention)  # fmt: skip
    assert isinstance(create_ring_attention(sparsity_ratio=0.5), RingBlockSparseAttention)
    with pytest.raises(ValueError, match=r"only apply to the 'block_sparse' implementation"):
        create_ring_attention("standard", sparsity_ratio=0.5)
    with pytest.warns(
        DeprecationWarning, match="use dilated_attention_pytorch.ring.RingBlockSparseAttention"
    ):
        from dilated_attention_pytorch import BlockSparseRingDilatedAttention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = BlockSparseRingDilatedAttention(
            [2048, 4096], [1, 2], sparsity_config={"sparsity_ratio": 0.9}
        )
    assert torch.equal(old.pattern(65536).block_mask, pattern.block_mask)
    # Another pattern type: the positional segments have no meaning there, and are dropped.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.warns(UserWarning, match=r"ignored for pattern_type='local_window'"):
            window = BlockSparseRingDilatedAttention(
                [64, 128], [1, 2],
                sparsity_config={"sparsity_ratio": 0.5, "pattern_type": "local_window",
                                 "block_size": 16},
            )  # fmt: skip
    new = RingBlockSparseAttention(sparsity_ratio=0.5, pattern_type="local_window", block_size=16)
    assert torch.equal(window.pattern(256).block_mask, new.pattern(256).block_mask)
    # A ring of one without torch.distributed is the single-device module.
    q = torch.randn(1, 256, 2, 8, dtype=torch.float64)
    small = RingBlockSparseAttention(sparsity_ratio=0.5, pattern_type="local_window", block_size=32)
    torch.testing.assert_close(
        small(q, q, q), block_sparse_attention(q, q, q, small.pattern(256)), **TOL
    )


# --------------------------------------------------------------------------- memory estimate

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _recorded_rows():
    for path in sorted(RESULTS.glob("block_sparse_nvidia-h*_*2026120[4-9].json")):
        data = json.loads(path.read_text())
        causal = bool(data["config"].get("causal"))
        heads = data["config"].get("heads", 16), data["config"].get("kv_heads")
        # Training steps only: the forward rows hold the output gradient and the saved
        # tensors too, which a no_grad forward (with_backward=False) does not.
        rows = [r for r in data["rows"]
                if r["method"] in ("triton", "flex") and "ms" in r and r["backward"]]  # fmt: skip
        for i, row in enumerate(rows):
            yield path.name, i, causal, heads, row


def test_memory_estimate_matches_recorded_gpu_peaks() -> None:
    # Peaks measured by bench_block_sparse.py on an H200 or H100 (inputs included;
    # grouped-query K/V where the run had --kv-heads). In the runs
    # before the benchmark cleared the caches between patterns, later rows also held
    # earlier patterns' cached index lists and FlexAttention block masks (up to 13%);
    # the first row of each run held only its own.
    checked, patterns = 0, {}
    for name, i, causal, (H, H_kv), row in _recorded_rows():
        ratio = min((0.5, 0.9, 0.97), key=lambda x: abs(x - row["sparsity"]))
        key = (row["pattern"], row["seq_len"], ratio, causal)
        if key not in patterns:
            patterns[key] = make_block_sparse_pattern(
                row["pattern"], row["seq_len"], block_size=128, sparsity_ratio=ratio,
                is_causal=causal,
            )  # fmt: skip
        pattern = patterns[key]
        est = block_sparse_memory_estimate(
            pattern, 1, H, row["head_dim"], backend=row["method"], num_kv_heads=H_kv
        )["total_per_device_gb"]
        measured = row["peak_gib"]
        fresh = i == 0 or row.get("estimate_gib") is not None  # caches cleared per row
        assert est <= measured * 1.01, (name, row, est)
        assert est >= measured * (0.98 if fresh else 0.85), (name, row, est)
        checked += 1
    assert checked >= 50


def test_memory_estimate_counts_the_kept_blocks() -> None:
    N, H, D = 4096, 4, 64
    one = [
        block_sparse_memory_estimate(make_block_sparse_pattern("random", N, block_size=64,
                                                               sparsity_ratio=r), 1, H, D)
        for r in (0.5, 0.97)
    ]  # fmt: skip
    # One device: the kernels hold nothing of size N x N, only the index lists grow.
    assert one[0]["parts"]["index_lists"] > one[1]["parts"]["index_lists"]
    assert one[0]["bytes_per_device"] - one[0]["parts"]["index_lists"] == (
        one[1]["bytes_per_device"] - one[1]["parts"]["index_lists"]
    )
    # A ring: what a rank receives and returns is the kept blocks of the others.
    ring = {
        (t, r): block_sparse_memory_estimate(
            make_block_sparse_pattern(t, N, block_size=64, sparsity_ratio=r), 1, H, D,
            ring_size=4,
        )
        for t in ("local_window", "random")
        for r in (0.5, 0.97)
    }  # fmt: skip
    assert ring["local_window", 0.97]["received_blocks"] <= 2
    for t in ("local_window", "random"):
        assert ring[t, 0.97]["bytes_per_device"] < ring[t, 0.5]["bytes_per_device"]
        est = ring[t, 0.5]
        per_block = 64 * H * D  # elements of one block of k (or v)
        assert est["parts"]["received_blocks"] == 2 * est["received_blocks"] * per_block * 2
    # A narrow window over 4 ranks: O(N/k) per rank. A random pattern at 0.5 keeps blocks
    # of every rank, so a rank receives almost all of them (and their fp32 gradients).
    narrow = make_block_sparse_pattern("local_window", N, block_size=64, sparsity_ratio=0.97)
    two = block_sparse_memory_estimate(narrow, 1, H, D, ring_size=2)["bytes_per_device"]
    assert ring["local_window", 0.97]["bytes_per_device"] < 0.6 * two
    others = 3 * (N // 64 // 4)
    assert ring["random", 0.5]["received_blocks"] >= 0.9 * others


def test_memory_estimate_of_the_modules_and_errors() -> None:
    module = BlockSparseAttention(64, 0.9, "local_window")
    est = module.get_memory_estimate(4096, 2, 4, 32, dtype=torch.float32)
    want = block_sparse_memory_estimate(module.pattern(4096), 2, 4, 32, dtype=torch.float32,
                                        backend="triton")  # fmt: skip
    assert est == want
    # What auto runs on CUDA: our kernels, for training and for a forward.
    for with_backward in (True, False):
        est = module.get_memory_estimate(4096, 2, 4, 128, with_backward=with_backward)
        want = block_sparse_memory_estimate(module.pattern(4096), 2, 4, 128,
                                            with_backward=with_backward, backend="triton")  # fmt: skip
        assert est == want
    flex = BlockSparseAttention(64, 0.9, "local_window", backend="flex")
    assert flex.get_memory_estimate(4096, 2, 4, 128) == block_sparse_memory_estimate(
        flex.pattern(4096), 2, 4, 128, backend="flex")  # fmt: skip
    # A head dim (or block size) the Triton kernels do not take: auto runs flex there.
    for m, D in ((module, 96), (BlockSparseAttention(48, 0.9, "local_window"), 64)):
        assert m.get_memory_estimate(4096, 2, 4, D) == block_sparse_memory_estimate(
            m.pattern(4096), 2, 4, D, backend="flex")  # fmt: skip
    ring = RingBlockSparseAttention(pattern_type="local_window", block_size=64, ring_size=4)
    assert ring.get_memory_estimate(4096, 1, 4, 32)["ring_size"] == 4
    layer = create_block_sparse_attention(64, 4, sparsity_ratio=0.5, pattern_type="local_window")
    with pytest.raises(TypeError, match=r"counts the attention only.*layer.attention"):
        layer.get_memory_estimate(4096)
    pattern = module.pattern(4096)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        block_sparse_memory_estimate(pattern, backend="pytorch")
    with pytest.raises(ValueError, match=r"ring of 3 ranks needs N/3 to be a multiple"):
        block_sparse_memory_estimate(pattern, ring_size=3)
    with pytest.raises(TypeError, match=r"pattern must be a BlockSparsePattern"):
        block_sparse_memory_estimate(torch.ones(4, 4, dtype=torch.bool))
    # Grouped-query attention: fewer K/V bytes, on one device and over a ring (where
    # the blocks that travel have the K/V heads only).
    mha, gqa = (module.get_memory_estimate(4096, 2, 4, 32, num_kv_heads=h) for h in (4, 1))
    assert gqa["num_kv_heads"] == 1 and mha == module.get_memory_estimate(4096, 2, 4, 32)
    # q, dout (4 heads each) and k, v of 1 head: 10 heads' worth of inputs against 16.
    assert gqa["parts"]["inputs"] * 16 == mha["parts"]["inputs"] * 10
    mha, gqa = (ring.get_memory_estimate(4096, 1, 4, 32, num_kv_heads=h) for h in (4, 2))
    assert gqa["received_blocks"] == mha["received_blocks"] > 0
    for part in ("received_blocks", "transfer_buffers"):
        assert gqa["parts"][part] * 2 == mha["parts"][part]
    with pytest.raises(ValueError, match=r"num_kv_heads must divide num_heads"):
        block_sparse_memory_estimate(pattern, num_heads=4, num_kv_heads=3)


def test_auto_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = (torch.randn(1, 128, 2, 16) for _ in range(3))
    with caplog.at_level(logging.DEBUG, logger="dilated_attention_pytorch"):
        block_sparse_attention(q, k, v, make_block_sparse_pattern("local_window", 128,
                                                                  block_size=32, sparsity_ratio=0.5))  # fmt: skip
    assert any("backend='auto' chose" in r.getMessage() for r in caplog.records)


def test_pattern_knobs_instead_of_a_ratio() -> None:
    module = BlockSparseAttention(64, None, "local_window", pattern_knobs={"window": 1})
    for N in (1024, 4096):
        pattern = module.pattern(N)
        assert pattern.knobs["window"] == 1 and pattern.requested_ratio is None
        assert int(pattern.block_mask.sum(-1).max()) == 3  # itself and one block each side
    assert "knobs={'window': 1}" in repr(module)  # part of the ring's settings check
    with pytest.raises(TypeError, match=r"pattern_knobs must be a dict"):
        BlockSparseAttention(64, None, "local_window", pattern_knobs=[("window", 1)])


def test_auto_backend_rule() -> None:
    # Measured on an H100 (benchmarks/results/block_sparse_nvidia-h100-80gb-hbm3_lse_heads_first_20261206.json
    # and ..._sweep_heads_first_20261206.json: N = 32K and 128K, D = 64 and 128, four
    # patterns, sparsity 0.5-0.97): forward+backward, our kernels were 1.00-1.50x flex's
    # speed on 37 of 38 rows (0.99x on the 38th, 2.29 against 2.27 ms); forward, 1.03-1.98x
    # on every D=128 row, and at D=64 flex was ahead on 4 of 18 rows (0.89-0.997x). So on
    # CUDA auto takes the Triton kernels wherever they run, for training too, else flex;
    # off CUDA flex where it runs (it does not: an empty reason list stands for it), else
    # pytorch.
    from types import SimpleNamespace

    from dilated_attention_pytorch.sparse.functional import auto_sparse_backend, ring_kernel

    cuda = SimpleNamespace(device=torch.device("cuda"), shape=(1, 64, 2, 128))  # device read
    assert auto_sparse_backend(cuda, [], []) == "triton"
    assert auto_sparse_backend(cuda, ["no"], []) == "triton"
    assert auto_sparse_backend(cuda, [], ["no"]) == "flex"
    assert auto_sparse_backend(cuda, ["no"], ["no"]) == "pytorch"
    cpu = torch.zeros(1, 64, 2, 16)
    assert auto_sparse_backend(cpu, [], []) == "flex"
    assert auto_sparse_backend(cpu, ["no"], []) == "pytorch"
    assert auto_sparse_backend(cpu, ["no"], ["no"]) == "pytorch"
    assert ring_kernel(cpu, "auto", 64, 0.0) == "pytorch"
    assert ring_kernel(cpu, "pytorch", 64, 0.0) == "pytorch"
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(ValueError, match=r"backend='triton' cannot run this call"):
            ring_kernel(cpu, "triton", 64, 0.0)
