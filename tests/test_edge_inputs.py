"""Edge inputs: the score scale, positions no head attends, huge segment lengths, mask
layouts, ``nn.MultiheadAttention``-style calls, tracing and copying ring modules.

Each behaviour is an error that says what to do, a warning, or the right result; the
ring parts run on 2 gloo ranks (one spawn for the module).
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed_utils import spawn

from dilated_attention_pytorch import (
    BlockSparseAttention,
    DilatedAttention,
    DilatedAttentionConfig,
    DistributedRingAttention,
    EnterpriseDistributedDilatedAttention,
    HilbertRingAttention,
    MultiheadDilatedAttention,
    RingBlockSparseAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
    block_sparse_attention,
    dense_dilated_attention,
    dilated_attention,
    get_memory_estimate,
    make_block_sparse_pattern,
    shard_sequence,
)
from dilated_attention_pytorch.plan import _PLANS
from dilated_attention_pytorch.ring import RingAttentionConfig
from dilated_attention_pytorch.validation import check_key_padding_mask

# float64 on both sides: only summation order differs.
F64 = {"atol": 1e-10, "rtol": 1e-10}


def _qkv(B: int = 2, N: int = 16, H: int = 2, D: int = 4) -> list[torch.Tensor]:
    return [torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3)]


# --------------------------------------------------------------------------- the scale

# Everything that accepts ``scale``, built or called with the given value.
SCALE_TAKERS = {
    "dilated_attention": lambda s: dilated_attention(*_qkv(), [8], [1], scale=s),
    "block_sparse_attention": lambda s: block_sparse_attention(
        *_qkv(N=32), make_block_sparse_pattern("local_window", 32, block_size=8), scale=s
    ),
    "DilatedAttention": lambda s: DilatedAttention([8], [1], scale=s),
    "MultiheadDilatedAttention": lambda s: MultiheadDilatedAttention(16, 2, [8], [1], scale=s),
    "StandardRingAttention": lambda s: StandardRingAttention([8], [1], scale=s),
    "HilbertRingAttention": lambda s: HilbertRingAttention([8], [1], scale=s),
    "DistributedRingAttention": lambda s: DistributedRingAttention([8], [1], scale=s),
    "RingMultiheadDilatedAttention": lambda s: RingMultiheadDilatedAttention(
        16, 2, [8], [1], scale=s
    ),
    "EnterpriseDistributedDilatedAttention": lambda s: EnterpriseDistributedDilatedAttention(
        16, 2, [8], [1], scale=s
    ),
    "BlockSparseAttention": lambda s: BlockSparseAttention(block_size=8, scale=s),
    "RingBlockSparseAttention": lambda s: RingBlockSparseAttention(block_size=8, scale=s),
    "DilatedAttentionConfig": lambda s: DilatedAttentionConfig(
        segment_lengths=[8], dilation_rates=[1], scale=s
    ),
}

RANGE = r"scale must be finite with 1.18e-38 <= \|scale\| <= 3.4e\+38 \(float32's normal range"


@pytest.mark.parametrize(
    ("scale", "error", "match"),
    [
        (0.0, ValueError, r"scale must be a finite nonzero number, got 0.0; pass None"),
        (math.nan, ValueError, r"scale must be a finite nonzero number, got nan"),
        (math.inf, ValueError, RANGE + r".*got float inf"),
        (-math.inf, ValueError, RANGE + r".*got float -inf"),
        (1e39, ValueError, RANGE + r".*got float 1e\+39"),
        (-1e-39, ValueError, RANGE + r".*got float -1e-39"),
        (10**400, ValueError, RANGE + r".*got int 1000000"),
        (True, TypeError, r"scale must be a real number \(a float\) or None .*got bool True"),
        ("0.1", TypeError, r"scale must be a real number .*got str '0.1'"),
        (1j, TypeError, r"scale must be a real number .*got complex 1j"),
        (
            torch.tensor(0.5),
            TypeError,
            r"got Tensor of shape \(\) and dtype torch.float32; pass a Python float",
        ),
    ],
    ids=[
        "0",
        "nan",
        "inf",
        "-inf",
        "1e39",
        "-1e-39",
        "10**400",
        "bool",
        "str",
        "complex",
        "tensor",
    ],
)
@pytest.mark.parametrize("taker", SCALE_TAKERS)
def test_a_bad_scale_is_rejected_everywhere(taker: str, scale, error, match) -> None:
    with pytest.raises(error, match=match):
        SCALE_TAKERS[taker](scale)


@pytest.mark.parametrize("taker", SCALE_TAKERS)
@pytest.mark.parametrize("scale", [-0.7, np.float32(0.25), 1e30, -3e38, 2e-38])
def test_a_finite_nonzero_scale_of_either_sign_is_accepted_everywhere(taker: str, scale) -> None:
    SCALE_TAKERS[taker](scale)


@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_a_negative_scale_is_the_oracle(branch_mixing: str, is_causal: bool) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, N=24, H=4, D=8))
    mask = torch.rand(2, 24) < 0.3
    args = ([8, 16], [1, 2])
    kw = dict(is_causal=is_causal, branch_mixing=branch_mixing, key_padding_mask=mask)
    out = DilatedAttention(*args, branch_mixing=branch_mixing, scale=-0.6)(
        q, k, v, is_causal=is_causal, key_padding_mask=mask
    )
    ref = dense_dilated_attention(q, k, v, *args, scale=-0.6, **kw)
    torch.testing.assert_close(out, ref, **F64)
    dout = torch.randn_like(out)
    for g, rg in zip(
        torch.autograd.grad(out, (q, k, v), dout),
        torch.autograd.grad(ref, (q, k, v), dout),
        strict=True,
    ):
        torch.testing.assert_close(g, rg, **F64)
    # A numpy scalar is a float like any other.
    torch.testing.assert_close(
        dilated_attention(q, k, v, *args, scale=np.float64(-0.6), **kw), ref, **F64
    )


def test_a_negative_scale_in_block_sparse_attention_is_masked_softmax() -> None:
    q, k, v = _qkv(N=32)
    pattern = make_block_sparse_pattern("local_window", 32, block_size=8)
    out = block_sparse_attention(q, k, v, pattern, scale=-0.6, backend="pytorch")
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * -0.6
    scores = scores.masked_fill(~pattern.token_mask("cpu")[None, None], -math.inf)
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)
    torch.testing.assert_close(out, ref, **F64)


def test_modules_store_the_scale_as_a_float() -> None:
    assert type(DilatedAttention([8], [1], scale=np.float32(0.25)).scale) is float
    config = DilatedAttentionConfig(segment_lengths=[8], dilation_rates=[1], scale=np.float32(0.5))
    assert type(config.scale) is float


# --------------------------------------------------------------------------- uncovered positions


@pytest.fixture
def fresh_plans():
    """Plans (and their once-per-configuration warning) built anew in this test."""
    _PLANS.clear()
    yield
    _PLANS.clear()


UNCOVERED_ONE_HEAD = (
    r"dilated attention with 1 head, segment_lengths=\[16\], dilation_rates=\[4\] and "
    r"branch_mixing='softmax' leaves some positions attended by no head, so their output is 0 "
    r"for every head \(3 of every 4 positions, e.g. positions 1, 2, 3, 5, 6, 7, 9, 10\)\. "
    r"These are the positions p whose offset in every branch is one no head uses: branch 0 "
    r"\(w=16, r=4, run by 1 head\): p mod 4 in \{1, 2, 3\}\. To cover every position use at "
    r"least 4 heads \(max\(dilation_rates\)\), or fewer or less dilated branches"
)


@pytest.mark.parametrize(
    "build",
    [
        lambda: MultiheadDilatedAttention(8, 1, [16], [4]),
        lambda: RingMultiheadDilatedAttention(8, 1, [16], [4]),
        lambda: EnterpriseDistributedDilatedAttention(8, 1, [16], [4]),
    ],
    ids=["multihead", "ring-multihead", "enterprise"],
)
def test_a_layer_whose_heads_leave_positions_uncovered_warns_once_at_construction(
    build, fresh_plans
) -> None:
    with pytest.warns(UserWarning, match=UNCOVERED_ONE_HEAD) as record:
        layer = build()
    assert len(record) == 1
    assert record[0].filename == __file__  # points at the user's line
    x = torch.randn(1, 32, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # the forward and a second layer of this configuration: silent
        build()
    # The warning is true: those tokens' attention output is 0 (then norm and out_proj).
    inner = torch.randn(1, 32, 1, 8)
    attn = dilated_attention(inner, inner, inner, [16], [4])
    covered = torch.arange(32) % 4 == 0
    assert attn[:, ~covered].abs().max() == 0 and attn[:, covered].abs().min() > 0


def test_head_split_with_fewer_heads_than_branches_warns_about_the_idle_branches(
    fresh_plans,
) -> None:
    # Every position is covered (branch 0 has r=1), so only the idle-branch warning fires.
    q, k, v = (torch.randn(1, 64, 2, 8, dtype=torch.float64) for _ in range(3))
    match = (
        r"branch_mixing='head_split' with 2 heads and 3 branches gives no head to branch 2 "
        r"\(w=32, r=4\): it is not computed\. Use at least 3 heads"
    )
    with pytest.warns(UserWarning, match=match) as record:
        out = dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], branch_mixing="head_split")
    assert len(record) == 1 and record[0].filename == __file__
    # What it computes: the first two branches only (the warning is true).
    two = dilated_attention(q, k, v, [8, 16], [1, 2], branch_mixing="head_split")
    torch.testing.assert_close(out, two, rtol=0, atol=0)
    with warnings.catch_warnings():  # once per configuration
        warnings.simplefilter("error")
        dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], branch_mixing="head_split")
        # Enough heads: silent.
        q3 = torch.randn(1, 64, 3, 8, dtype=torch.float64)
        dilated_attention(q3, q3, q3, [8, 16, 32], [1, 2, 4], branch_mixing="head_split")


def test_the_function_warns_once_per_configuration(fresh_plans) -> None:
    q = torch.randn(1, 32, 1, 4)
    # head_split with fewer heads than branches: branch 1 runs no head at all.
    match = (
        r"1 head, segment_lengths=\[8, 16\], dilation_rates=\[2, 2\] and "
        r"branch_mixing='head_split'.*\(1 of every 2 positions, e.g. positions 1, 3, 5, "
        r".*branch 0 \(w=8, r=2, run by 1 head\): p mod 2 in \{1\}; branch 1 \(w=16, r=2, run "
        r"by 0 heads\): p mod 2 in \{0, 1\}\. To cover every position use at least 4 heads "
        r"\(every branch's group of heads then has one head per offset\)"
    )
    with pytest.warns(UserWarning, match=match) as record:
        out = dilated_attention(q, q, q, [8, 16], [2, 2], branch_mixing="head_split")
    assert len(record) == 1 and record[0].filename == __file__
    assert out[:, 1::2].abs().max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dilated_attention(q, q, q, [8, 16], [2, 2], branch_mixing="head_split")
    # DilatedAttention learns the head count at its first call.
    with pytest.warns(UserWarning, match=r"1 head, segment_lengths=\[8\], dilation_rates=\[2\]"):
        DilatedAttention([8], [2])(q, q, q)
    # w % r != 0: the offset is taken within the segment.
    with pytest.warns(UserWarning, match=r"\(w=10, r=3, run by 1 head\): \(p mod 10\) mod 3"):
        dilated_attention(q, q, q, [10], [3])


@pytest.mark.parametrize(
    ("ws", "rs", "H", "mixing"),
    [
        ([8, 32], [1, 4], 2, "softmax"),  # offsets 2, 3 of branch 1 unused, branch 0 covers
        ([16], [4], 4, "softmax"),
        ([8, 16], [2, 2], 3, "head_split"),  # groups of 2 and 1 heads: branch 0 covers all
        ([8, 16], [2, 2], 4, "head_split"),
    ],
)
def test_no_warning_when_every_position_has_a_head(ws, rs, H, mixing, fresh_plans) -> None:
    q = torch.randn(1, 32, H, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dilated_attention(q, q, q, ws, rs, branch_mixing=mixing)
        MultiheadDilatedAttention(4 * H, H, ws, rs, branch_mixing=mixing)


# --------------------------------------------------------------------------- huge branches


BOUND = r"must be at most 2\*\*40 = 1099511627776, got {}; every segment length and dilation rate"


@pytest.mark.parametrize(
    "call",
    [
        lambda ws, rs: dilated_attention(*_qkv(), ws, rs),
        lambda ws, rs: DilatedAttention(ws, rs),
        lambda ws, rs: MultiheadDilatedAttention(16, 2, ws, rs),
        lambda ws, rs: StandardRingAttention(ws, rs),
        lambda ws, rs: DilatedAttentionConfig(segment_lengths=ws, dilation_rates=rs),
        lambda ws, rs: RingAttentionConfig(segment_lengths=ws, dilation_rates=rs),
        lambda ws, rs: get_memory_estimate(16, segment_lengths=ws, dilation_rates=rs),
        lambda ws, rs: BlockSparseAttention(segment_lengths=ws, dilation_rates=rs, block_size=8),
    ],
)
def test_segment_lengths_and_dilation_rates_are_bounded(call) -> None:
    with pytest.raises(ValueError, match=r"segment_lengths\[0\] " + BOUND.format(2**62)):
        call([2**62], [1])
    with pytest.raises(ValueError, match=r"dilation_rates\[1\] " + BOUND.format(2**40 + 1)):
        call([8, 2**40], [1, 2**40 + 1])


@pytest.mark.filterwarnings("ignore:dilated attention with 3 heads:UserWarning")  # r = 2**39
def test_the_largest_segment_length_computes_the_oracle() -> None:
    q, k, v = _qkv(N=24, H=3)
    for ws, rs in (([2**40], [1]), ([8, 2**40], [1, 2**40]), ([2**40], [2**39])):
        out = dilated_attention(q, k, v, ws, rs, is_causal=True)
        torch.testing.assert_close(
            out, dense_dilated_attention(q, k, v, ws, rs, is_causal=True), **F64
        )


# --------------------------------------------------------------------------- mask layouts


def _masks(B: int, N: int) -> dict[str, torch.Tensor]:
    """Valid ``(B, N)`` masks in layouts other than token-major, with a row all padding."""
    transposed = (torch.rand(N, B) < 0.3).t()
    transposed[0] = True
    expanded = (torch.rand(1, N) < 0.3).expand(B, N)
    return {"transposed": transposed, "expanded": expanded}


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_a_mask_in_any_layout_is_accepted(layout: str) -> None:
    q, k, v = _qkv(B=3, N=16, H=2)
    mask = _masks(3, 16)[layout]
    assert not mask.is_contiguous()
    want = dilated_attention(q, k, v, [4, 8], [1, 2], key_padding_mask=mask.contiguous())
    torch.testing.assert_close(
        dilated_attention(q, k, v, [4, 8], [1, 2], key_padding_mask=mask), want, **F64
    )
    for module in (DilatedAttention([4, 8], [1, 2]), StandardRingAttention([4, 8], [1, 2])):
        torch.testing.assert_close(module(q, k, v, key_padding_mask=mask), want, **F64)
    layer = MultiheadDilatedAttention(8, 2, [4, 8], [1, 2], dtype=torch.float64)
    x = torch.randn(3, 16, 8, dtype=torch.float64)
    torch.testing.assert_close(
        layer(x, key_padding_mask=mask)[0], layer(x, key_padding_mask=mask.contiguous())[0], **F64
    )


def test_the_mask_check_returns_a_token_major_mask() -> None:
    q = torch.randn(3, 16, 2, 4)
    for mask in _masks(3, 16).values():
        checked = check_key_padding_mask(mask, q)
        assert checked.is_contiguous() and torch.equal(checked, mask)
    token_major = torch.zeros(3, 16, dtype=torch.bool)
    assert check_key_padding_mask(token_major, q) is token_major
    assert check_key_padding_mask(None, q) is None


# --------------------------------------------------------------------------- nn.MultiheadAttention calls


LAYERS = {
    "multihead": lambda: MultiheadDilatedAttention(16, 2, [4, 8], [1, 2], dtype=torch.float64),
    "ring-multihead": lambda: RingMultiheadDilatedAttention(
        16, 2, [4, 8], [1, 2], dtype=torch.float64
    ),
    "enterprise": lambda: EnterpriseDistributedDilatedAttention(
        16, 2, [4, 8], [1, 2], dtype=torch.float64
    ),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_a_layer_takes_nn_multihead_attentions_positional_order(kind: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    mask = torch.rand(2, 16) < 0.3
    want, _ = layer(x, key_padding_mask=mask)
    # query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
    # is_causal: nn.MultiheadAttention.forward's order.
    got, weights = layer(x, x, x, mask)
    assert weights is None
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(layer(x, x, x, mask, False, None, True)[0], want, **F64)
    torch.testing.assert_close(
        layer(x, x, x, mask, False, None, True, True)[0],
        layer(x, key_padding_mask=mask, is_causal=True)[0],
        **F64,
    )
    with pytest.raises(ValueError, match=r"need_weights=True is not supported"):
        layer(x, x, x, mask, True)
    with pytest.raises((TypeError, ValueError), match=r"attn_mask is not supported"):
        layer(x, x, x, mask, False, torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(
        TypeError,
        match=r"key_padding_mask must be a bool tensor .* got bool; for causal "
        r"attention pass is_causal=True",
    ):
        layer(x, x, x, True)


@pytest.mark.parametrize(
    "build",
    [
        lambda: DilatedAttention([4, 8], [1, 2]),
        lambda: StandardRingAttention([4, 8], [1, 2]),
        lambda: HilbertRingAttention([4, 8], [1, 2]),
        lambda: DistributedRingAttention([4, 8], [1, 2]),
    ],
    ids=["dilated", "ring", "hilbert", "distributed-ring"],
)
def test_the_fourth_positional_argument_of_an_attention_module_is_is_causal(build) -> None:
    attn = build()
    q, k, v = _qkv(N=16)
    mask = torch.rand(2, 16) < 0.3
    torch.testing.assert_close(attn(q, k, v, True), attn(q, k, v, is_causal=True), **F64)
    torch.testing.assert_close(
        attn(q, k, v, True, mask), attn(q, k, v, is_causal=True, key_padding_mask=mask), **F64
    )
    with pytest.raises(
        TypeError,
        match=r"is_causal must be a bool, got Tensor of shape \(2, 16\) and dtype "
        r"torch.bool; a \(B, N\) padding mask goes in key_padding_mask=",
    ):
        attn(q, k, v, mask)


def test_block_sparse_attention_takes_is_causal_fourth_too() -> None:
    attn = BlockSparseAttention(block_size=8, pattern_type="local_window")
    q, k, v = _qkv(N=32)
    torch.testing.assert_close(attn(q, k, v, True), attn(q, k, v, is_causal=True), **F64)
    with pytest.raises(TypeError, match=r"is_causal must be a bool, got Tensor"):
        attn(q, k, v, torch.zeros(2, 32, dtype=torch.bool))


@pytest.mark.parametrize("kind", LAYERS)
def test_a_layer_checks_the_input_dtype_itself(kind: str) -> None:
    layer = LAYERS[kind]().to(torch.bfloat16)
    x = torch.randn(1, 16, 16)
    with pytest.raises(
        TypeError, match=r"query is torch.float32 but the layer's parameters are torch.bfloat16"
    ):
        layer(x)
    ids = torch.randint(0, 10, (1, 16, 16))
    floating = r"query must be a floating-point tensor \(B, N, E\), got dtype torch.int64; embed"
    with pytest.raises(TypeError, match=floating):
        layer(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=floating):
        layer(ids)
    with pytest.raises(TypeError, match=r"value must be a floating-point tensor"):
        layer(x.bfloat16(), x.bfloat16(), ids)


# --------------------------------------------------------------------------- tracing


TRACE = r"torch.jit.trace cannot record dilated attention.*Use torch.compile\(module\) instead"


def test_tracing_says_it_is_unsupported() -> None:
    layer = MultiheadDilatedAttention(16, 2, [8], [1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings about shape checks
        with pytest.raises(TypeError, match=TRACE):
            torch.jit.trace(layer, (torch.randn(1, 16, 16),))
        with pytest.raises(TypeError, match=TRACE):
            torch.jit.trace(DilatedAttention([8], [1]), tuple(_qkv()))
        with pytest.raises(TypeError, match=TRACE):
            torch.jit.trace(BlockSparseAttention(block_size=8), tuple(_qkv(N=32)))


# --------------------------------------------------------------------------- copying ring modules


def test_ring_modules_copy_and_pickle_without_a_process_group() -> None:
    q, k, v = _qkv(N=16)
    for module in (
        StandardRingAttention([4, 8], [1, 2]),
        DistributedRingAttention([4, 8], [1, 2]),
        RingBlockSparseAttention(block_size=8, pattern_type="local_window"),
    ):
        want = module(q, k, v)
        for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            torch.testing.assert_close(copied(q, k, v), want, **F64)


SEGMENTS, DILATIONS = (4, 8, 16), (1, 2, 4)  # local, one shard, the whole sequence (2 ranks)


def _copies(module: torch.nn.Module, run, group) -> dict[str, Any]:
    """``run(module)``, and of its copies: shallow and deep (which share ``group``) and
    pickled (which re-resolves it)."""
    want = run(module)
    shallow, deep = copy.copy(module), copy.deepcopy(module)
    pickled = pickle.loads(pickle.dumps(module))
    inner = (lambda m: m.attention) if hasattr(module, "embed_dim") else (lambda m: m)
    return {
        "shares_group": [inner(m).process_group is group for m in (shallow, deep)],
        "pickled_group": inner(pickled).process_group,
        "same": [(run(m), want) for m in (shallow, deep, pickled)],
    }


def _worker(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    torch.manual_seed(3)  # the same inputs on every rank
    q, k, v = (torch.randn(2, 16, 4, 8, dtype=torch.float64) for _ in range(3))
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    pair = dist.new_group([0, 1])  # not WORLD, but over WORLD's ranks
    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    results: dict[str, Any] = {}

    def attend(m):
        return m(q, k, v, True)

    results["standard"] = _copies(
        StandardRingAttention(SEGMENTS, DILATIONS, process_group=pair), attend, pair
    )
    results["hilbert"] = _copies(
        HilbertRingAttention(SEGMENTS, DILATIONS, process_group=pair), attend, pair
    )
    results["distributed"] = _copies(
        DistributedRingAttention(SEGMENTS, DILATIONS, process_group=pair), attend, pair
    )
    results["block-sparse"] = _copies(
        RingBlockSparseAttention(block_size=4, pattern_type="local_window", process_group=pair),
        attend,
        pair,
    )
    layer = RingMultiheadDilatedAttention(
        32, 4, SEGMENTS, DILATIONS, process_group=pair, dtype=torch.float64
    )
    results["multihead"] = _copies(layer, lambda m: m(x, is_causal=True)[0], pair)

    # A group that is not all of WORLD: the unpickled module asks for it, then works.
    lonely = StandardRingAttention(SEGMENTS, DILATIONS, process_group=alone)
    unpickled = pickle.loads(pickle.dumps(lonely))
    try:
        unpickled(q, k, v)
        results["needs_group"] = None
    except ValueError as exc:
        results["needs_group"] = str(exc)
    unpickled.process_group = alone
    results["regrouped"] = (unpickled(q, k, v), lonely(q, k, v))

    # The ring path takes masks in any layout, positional is_causal and a negative scale.
    ring = StandardRingAttention(SEGMENTS, DILATIONS, scale=-0.4)
    single = DilatedAttention(SEGMENTS, DILATIONS, scale=-0.4)
    mask = (torch.rand(16, 2) < 0.3).t()
    want = single(q, k, v, is_causal=True, key_padding_mask=mask.contiguous())
    results["ring"] = [
        (ring(q, k, v, True, mask), want),
        (
            ring(
                *(shard_sequence(t) for t in (q, k, v)),
                True,
                shard_sequence(mask),
                already_split=True,
            ),
            shard_sequence(want),
        ),
        (
            want,
            dense_dilated_attention(
                q, k, v, SEGMENTS, DILATIONS, is_causal=True, scale=-0.4, key_padding_mask=mask
            ),
        ),
    ]
    return results


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return spawn(_worker, 2)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["standard", "hilbert", "distributed", "block-sparse", "multihead"]
)
def test_a_ring_module_with_a_process_group_copies_and_pickles(results, name: str) -> None:
    for rank, res in enumerate(results):
        r = res[name]
        assert all(r["shares_group"]), f"rank {rank}: copies must share the process group"
        assert r["pickled_group"] is None
        for got, want in r["same"]:
            torch.testing.assert_close(got, want, **F64)


@pytest.mark.distributed
def test_an_unpickled_ring_module_asks_for_a_group_that_is_not_world(results) -> None:
    for rank, res in enumerate(results):
        assert re.search(
            rf"this StandardRingAttention was unpickled without its process group \(a process "
            rf"group cannot be pickled\), a group over global ranks \[{rank}\]; set "
            rf"module.process_group = <that group>",
            res["needs_group"],
        ), res["needs_group"]
        torch.testing.assert_close(*res["regrouped"], **F64)


@pytest.mark.distributed
def test_the_ring_takes_any_mask_layout_positional_is_causal_and_a_negative_scale(
    results,
) -> None:
    for res in results:
        for got, want in res["ring"]:
            torch.testing.assert_close(got, want, **F64)
