"""Incremental decoding with DilatedKVCache equals the causal call over the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from dilated_attention_pytorch import (
    DilatedAttention,
    StandardRingAttention,
    dense_dilated_attention,
    dilated_attention,
)
from dilated_attention_pytorch.decoding import DilatedKVCache, cached_dilated_attention
from dilated_attention_pytorch.models import LongNetLM

DT = torch.float64
CASES = [
    ([8, 16], [1, 2], "softmax"),
    ([10, 24], [3, 4], "softmax"),  # r does not divide w; ragged segments
    ([4, 8, 32], [1, 2, 8], "head_split"),
    ([8, 32], [2, 8], "softmax"),  # 6 heads < r = 8, no r = 1: some positions get nothing
]


def _decode(q, k, v, cache, prompt: int, chunk: int) -> torch.Tensor:
    outs = [cached_dilated_attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], cache)]
    for t in range(prompt, q.shape[1], chunk):
        outs.append(cached_dilated_attention(q[:, t : t + chunk], k[:, t : t + chunk],
                                             v[:, t : t + chunk], cache))  # fmt: skip
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(("ws", "rs", "mixing"), CASES)
@pytest.mark.parametrize("prompt", [1, 7, 16, 17])
def test_token_by_token_equals_the_whole_causal_call(ws, rs, mixing, prompt) -> None:
    B, N, H, D = 2, 50, 6, 4
    q, k, v = (torch.randn(B, N, H, D, dtype=DT) for _ in range(3))
    whole = dilated_attention(q, k, v, ws, rs, is_causal=True, branch_mixing=mixing)
    oracle = dense_dilated_attention(q, k, v, ws, rs, is_causal=True, branch_mixing=mixing)
    torch.testing.assert_close(whole, oracle, atol=1e-12, rtol=0)
    for chunk in (1, 3):
        cache = DilatedKVCache(ws, rs, H, branch_mixing=mixing)
        got = _decode(q, k, v, cache, prompt, chunk)
        torch.testing.assert_close(got, oracle, atol=1e-12, rtol=0)
        assert cache.position == N


def test_values_a_row_does_not_read_stay_out_of_it() -> None:
    # Head 1 has offset 1 of r = 2: it attends nothing at even positions (output 0), and
    # an inf in a value it reads later must not reach those rows.
    q, k, v = (torch.randn(1, 8, 2, 4, dtype=DT) for _ in range(3))
    v[0, 1, 1] = math.inf
    whole = dilated_attention(q, k, v, [4], [2], is_causal=True)
    got = _decode(q, k, v, DilatedKVCache([4], [2], 2), 1, 1)
    finite = torch.isfinite(whole)
    assert torch.equal(torch.isfinite(got), finite)  # the same rows read the inf
    torch.testing.assert_close(got[finite], whole[finite], atol=1e-12, rtol=0)
    assert got[0, 2, 1].eq(0).all() and got[0, 4, 1].eq(0).all()


def test_branches_merge_exactly_at_large_logits() -> None:
    # Branches sharing their best key: a single float32 LSE per branch would round the
    # merge; the cache merges relative to the best score, like the whole call.
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    for scale in (1e3, 1e6):
        whole = dilated_attention(q.double(), k.double(), v.double(), [8, 16], [1, 2],
                                  is_causal=True, scale=scale)  # fmt: skip
        cache = DilatedKVCache([8, 16], [1, 2], 2, scale=scale)
        got = _decode(q, k, v, cache, 5, 1)
        torch.testing.assert_close(got.double(), whole, atol=2e-6, rtol=0)


def test_head_split_cache_keeps_only_each_branchs_heads() -> None:
    cache = DilatedKVCache([8, 16], [1, 2], 4, branch_mixing="head_split")
    q, k, v = (torch.randn(1, 20, 4, 8) for _ in range(3))
    _decode(q, k, v, cache, 10, 2)
    assert [t.shape[2] for t in cache.keys] == [2, 2]  # heads 0-1 run w = 8, 2-3 run w = 16
    assert cache.nbytes() == 2 * (8 + 8) * 2 * 8 * 4


def test_empty_prompt_and_empty_steps() -> None:
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=DT) for _ in range(3))
    cache = DilatedKVCache([4, 8], [1, 2], 2)
    assert cached_dilated_attention(q[:, :0], k[:, :0], v[:, :0], cache).shape == (1, 0, 2, 4)
    got = _decode(q, k, v, cache, 0, 5)
    torch.testing.assert_close(got, dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True))
    assert cached_dilated_attention(q[:, :0], k[:, :0], v[:, :0], cache).shape == (1, 0, 2, 4)


def test_cache_size_does_not_grow_with_the_sequence() -> None:
    ws, rs, H, D = [16, 32, 64], [1, 2, 4], 4, 8
    sizes = []
    for n in (20, 200):
        q, k, v = (torch.randn(1, n, H, D) for _ in range(3))
        cache = DilatedKVCache(ws, rs, H)
        _decode(q, k, v, cache, n // 2, 5)
        sizes.append(cache.nbytes())
    # K and V: sum over branches of ceil(w / r) slots, per head, in float32.
    assert sizes == [2 * sum(math.ceil(w / r) for w, r in zip(ws, rs)) * H * D * 4] * 2


def test_module_cache_argument_and_errors() -> None:
    attn = DilatedAttention([8, 16], [1, 2])
    q, k, v = (torch.randn(1, 20, 4, 8, dtype=DT) for _ in range(3))
    cache = attn.new_cache(4)
    out = torch.cat([attn(q[:, :12], k[:, :12], v[:, :12], is_causal=True, cache=cache),
                     attn(q[:, 12:], k[:, 12:], v[:, 12:], is_causal=True, cache=cache)], 1)  # fmt: skip
    torch.testing.assert_close(out, attn(q, k, v, is_causal=True), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="needs is_causal=True"):
        attn(q, k, v, cache=attn.new_cache(4))
    with pytest.raises(ValueError, match="built for 4 query and 4 K/V heads"):
        cached_dilated_attention(*(t[:, :, :2] for t in (q, k, v)), attn.new_cache(4))
    with pytest.raises(ValueError, match="call cache.reset"):
        cached_dilated_attention(q[:1, :1].expand(2, 1, 4, 8), q[:1, :1].expand(2, 1, 4, 8),
                                 q[:1, :1].expand(2, 1, 4, 8), cache)  # fmt: skip
    with pytest.raises(ValueError, match="call cache.reset"):
        cached_dilated_attention(*(t[:, :1].float() for t in (q, k, v)), cache)  # dtype
    with pytest.raises(ValueError, match="built for 4 query and 4 K/V heads"):
        cached_dilated_attention(*(t[:, :1, :1] for t in (q, k, v)), cache)
    with pytest.raises(ValueError, match="this module's settings"):
        DilatedAttention([4, 8], [1, 2])(q, k, v, is_causal=True, cache=attn.new_cache(4))
    with pytest.raises(ValueError, match="this module's settings"):
        DilatedAttention([8, 16], [1, 2], scale=0.1)(q, k, v, True, cache=attn.new_cache(4))
    dropping = DilatedAttention([8, 16], [1, 2], dropout=0.5)
    with pytest.raises(ValueError, match="dropout"):
        dropping(q, k, v, is_causal=True, cache=dropping.new_cache(4))
    with pytest.raises(TypeError, match="cache must be a DilatedKVCache"):
        cached_dilated_attention(q, k, v, {})
    cache.reset()
    assert cache.position == 0 and cache.nbytes() == 0


def test_language_model_decodes_with_its_caches() -> None:
    torch.manual_seed(0)
    model = LongNetLM(256, 32, 4, 2, [16, 32, 64], [1, 2, 4], dtype=DT)
    ids = torch.randint(0, 256, (2, 90))
    whole = model(ids)
    caches = model.new_caches()
    with torch.no_grad():
        steps = [model(ids[:, :37], caches=caches)]
        steps += [model(ids[:, t : t + 1], caches=caches) for t in range(37, 90)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match=r"run them under torch.no_grad\(\)"):
        model(ids[:, 90:], caches=caches)  # parameters need grad: steps would lose it
    with torch.no_grad(), pytest.raises(ValueError, match="positions must start at 90"):
        model(ids[:, :1], caches=caches, positions=torch.tensor([3]))
    # generate() with caches picks the tokens the uncached forward picks.
    tokens = ids[:, :20]
    for _ in range(12):
        tokens = torch.cat((tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(ids[:, :20], 12, temperature=0), tokens)
    with pytest.raises(ValueError, match="need the single-device DilatedAttention"):
        LongNetLM(256, 32, 4, 1, attention="dense").new_caches()
    with pytest.raises(ValueError, match="one cache per block"):
        model(ids[:, :4], caches=caches[:1])


def test_ring_modules_have_no_decoding_cache() -> None:
    with pytest.raises(TypeError, match="has no decoding cache"):
        StandardRingAttention([8, 16], [1, 2]).new_cache(4)


def test_grouped_query_language_model_decodes_with_its_caches() -> None:
    # 4 query heads on 2 K/V heads: smaller projections and caches, the same logits step
    # by step as the whole causal forward.
    torch.manual_seed(1)
    model = LongNetLM(256, 32, 4, 2, [16, 32], [1, 4], num_kv_heads=2, dtype=DT)
    assert model.blocks[0].attn.k_proj.weight.shape == (16, 32)
    ids = torch.randint(0, 256, (1, 50))
    whole = model(ids)
    caches = model.new_caches()
    with torch.no_grad():
        steps = [model(ids[:, :21], caches=caches)]
        steps += [model(ids[:, t : t + 1], caches=caches) for t in range(21, 50)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-12, rtol=0)
    mha_cache = LongNetLM(256, 32, 4, 2, [16, 32], [1, 4], dtype=DT).new_caches()[0]
    with torch.no_grad():
        mha_cache.fill(torch.zeros(1, 21, 4, 8, dtype=DT), torch.zeros(1, 21, 4, 8, dtype=DT))
    assert caches[0].nbytes() < mha_cache.nbytes()


def test_an_empty_prompt_leaves_the_cache_free_for_any_next_prompt() -> None:
    # position 0 after an empty prompt: the next call is a new prompt of any batch size,
    # and it computes what a fresh cache computes.
    cache, fresh = DilatedKVCache([4], [1], 2), DilatedKVCache([4], [1], 2)
    x = torch.randn(2, 6, 2, 4, dtype=torch.float64)
    empty = cached_dilated_attention(x[:, :0], x[:, :0], x[:, :0], cache)
    assert empty.shape == (2, 0, 2, 4) and cache.position == 0
    got = cached_dilated_attention(x[:1], x[:1], x[:1], cache)
    torch.testing.assert_close(got, cached_dilated_attention(x[:1], x[:1], x[:1], fresh))


def test_a_prompt_under_inference_mode_then_steps_under_no_grad() -> None:
    # The prompt's buffers are inference tensors; the steps outside inference_mode go on
    # with copies and compute what a cache used under one mode computes.
    ws, rs, H = [8, 16], [1, 2], 4
    q, k, v = (torch.randn(1, 20, H, 4, dtype=DT) for _ in range(3))
    mixed, plain = DilatedKVCache(ws, rs, H), DilatedKVCache(ws, rs, H)
    with torch.inference_mode():
        outs = [cached_dilated_attention(q[:, :9], k[:, :9], v[:, :9], mixed)]
    for t in range(9, 20):
        # no_grad steps, then inference_mode again for the last one
        with torch.inference_mode() if t == 19 else torch.no_grad():
            outs.append(cached_dilated_attention(q[:, t : t + 1], k[:, t : t + 1],
                                                 v[:, t : t + 1], mixed))  # fmt: skip
    want = _decode(q, k, v, plain, 9, 1)
    torch.testing.assert_close(torch.cat(outs, dim=1), want, atol=1e-12, rtol=0)
