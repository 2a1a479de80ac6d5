"""Incremental decoding with DilatedKVCache equals the causal call over the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from dilated_attention_pytorch import DilatedAttention, dense_dilated_attention, dilated_attention
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
    assert got[:, prompt:].abs().sum() > 0


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
    with pytest.raises(ValueError, match="built for 4 heads"):
        cached_dilated_attention(*(t[:, :, :2] for t in (q, k, v)), attn.new_cache(4))
    with pytest.raises(ValueError, match="call cache.reset"):
        cached_dilated_attention(q[:1, :1].expand(2, 1, 4, 8), q[:1, :1].expand(2, 1, 4, 8),
                                 q[:1, :1].expand(2, 1, 4, 8), cache)  # fmt: skip
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
    steps = [model(ids[:, :37], caches=caches)]
    steps += [model(ids[:, t : t + 1], caches=caches) for t in range(37, 90)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-12, rtol=0)
    # generate() with caches picks the tokens the uncached forward picks.
    tokens = ids[:, :20]
    for _ in range(12):
        tokens = torch.cat((tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(ids[:, :20], 12, temperature=0), tokens)
    with pytest.raises(ValueError, match="need the single-device DilatedAttention"):
        LongNetLM(256, 32, 4, 1, attention="dense").new_caches()
    with pytest.raises(ValueError, match="one cache per block"):
        model(ids[:, :4], caches=caches[:1])
