"""Every bad input of the functional API raises a clear, pinned error."""

from __future__ import annotations

import warnings

import pytest
import torch

from dilated_attention_pytorch import dilated_attention


def _qkv(*shape: int, dtype: torch.dtype = torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    ("ws", "rs", "exc", "match"),
    [
        ([], [], ValueError, "must be non-empty"),
        ([4, 8], [1], ValueError, "same length"),
        ([4, 0], [1, 1], ValueError, r"segment_lengths\[1\] must be a positive int, got 0"),
        ([4], [-1], ValueError, r"dilation_rates\[0\] must be a positive int, got -1"),
        ([4], [8], ValueError, "dilation rate 8 is larger than its segment length 4"),
        ([4.0], [1], TypeError, r"segment_lengths\[0\] must be an int, got float"),
        ([4], [True], TypeError, r"dilation_rates\[0\] must be an int, got bool"),
        (4, [1], TypeError, "segment_lengths must be a list or tuple"),
    ],
)
def test_bad_branches(ws, rs, exc, match) -> None:
    q, k, v = _qkv(1, 8, 2, 4)
    with pytest.raises(exc, match=match):
        dilated_attention(q, k, v, ws, rs)


def test_bad_tensors() -> None:
    q, k, v = _qkv(1, 8, 2, 4)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        dilated_attention(q.numpy(), k, v, [4], [1])
    with pytest.raises(
        ValueError, match=r"q must have 4 dims \(B, N, H, D\).*got shape \(8, 2, 4\)"
    ):
        dilated_attention(q[0], k[0], v[0], [4], [1])
    with pytest.raises(
        ValueError,
        match=r"k must have shape \(B, N, H_kv, D\) = \(1, 8, H_kv, 4\) like q \(1, 8, 2, 4\), "
        r"got \(1, 7, 2, 4\)",
    ):
        dilated_attention(q, k[:, :7], v, [4], [1])
    q3 = torch.randn(1, 8, 3, 4)
    with pytest.raises(ValueError, match=r"k has 2 heads, which must divide q's 3 heads"):
        dilated_attention(q3, k, v, [4], [1])
    with pytest.raises(
        ValueError, match=r"k and v must have one shape.*k \(1, 8, 2, 4\) and v \(1, 8, 1, 4\)"
    ):
        dilated_attention(q, k, v[:, :, :1], [4], [1])
    with pytest.raises(
        ValueError, match="q, k and v must share one dtype, got q torch.float32 and v torch.float64"
    ):
        dilated_attention(q, k, v.double(), [4], [1])
    with pytest.raises(ValueError, match=r"unsupported dtype torch.int64"):
        dilated_attention(q.long(), k.long(), v.long(), [4], [1])
    with pytest.raises(ValueError, match=r"head_dim \(the last dim of q, k, v\) must be >= 1"):
        dilated_attention(q[..., :0], k[..., :0], v[..., :0], [4], [1])
    with pytest.raises(ValueError, match="q, k and v must be on one device"):
        dilated_attention(q, k.to("meta"), v, [4], [1])


def test_bad_mask() -> None:
    q, k, v = _qkv(2, 8, 2, 4)
    with pytest.raises(
        ValueError,
        match=r"key_padding_mask must have shape \(B, N\) = \(2, 8\), the batch and tokens of q, got \(2, 7\)",
    ):
        dilated_attention(q, k, v, [4], [1], key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have dtype torch.bool"):
        dilated_attention(q, k, v, [4], [1], key_padding_mask=torch.zeros(2, 8))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        dilated_attention(q, k, v, [4], [1], key_padding_mask=[[True] * 8] * 2)


def test_bad_options() -> None:
    q, k, v = _qkv(1, 8, 2, 4)
    with pytest.raises(
        ValueError, match=r"branch_mixing must be one of \['softmax', 'head_split'\], got 'mean'"
    ):
        dilated_attention(q, k, v, [4], [1], branch_mixing="mean")
    with pytest.raises(
        ValueError, match=r"unknown backend 'cudnn'; valid backends are \['auto', .*'pytorch'"
    ):
        dilated_attention(q, k, v, [4], [1], backend="cudnn")
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        dilated_attention(q, k, v, [4], [1], dropout_p=1.5)
    with pytest.raises(ValueError, match="scale must be a finite nonzero number, got 0.0"):
        dilated_attention(q, k, v, [4], [1], scale=0.0)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        dilated_attention(q, k, v, [4], [1], is_causal="yes")


def test_triton_backend_without_triton_says_how_to_install() -> None:
    from dilated_attention_pytorch.validation import check_backend_name

    with pytest.raises(ValueError, match=r"pip install 'dilated-attention-pytorch\[triton\]'"):
        check_backend_name("triton", ["pytorch"])


def test_transposed_layout_warns() -> None:
    # (B, H, N, D) = (1, 8, 1024, 16) passed where (B, N, H, D) is expected: 8 "tokens",
    # 1024 "heads", every segment longer than the 8 tokens.
    q = torch.randn(1, 8, 1024, 16)
    with pytest.warns(UserWarning, match=r"\(B, H, N, D\).*pass q\.transpose\(1, 2\)"):
        dilated_attention(q, q, q, [256, 512], [1, 2])
    # The right layout, and short sequences with many heads but segments that fit: silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dilated_attention(
            q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), [256, 512], [1, 2]
        )
        small = torch.randn(1, 4, 8, 16)
        dilated_attention(small, small, small, [2, 4], [1, 2])
        # Few tokens, many heads, long segments: a short sequence, not a transposed one.
        short = torch.randn(1, 4, 16, 16)
        dilated_attention(short, short, short, [2048, 4096], [1, 2])
        one = torch.randn(1, 1, 8, 16)  # one token (a decoding step)
        dilated_attention(one, one, one, [4], [1])


def test_multihead_layer_says_what_to_do() -> None:
    from dilated_attention_pytorch import MultiheadDilatedAttention

    layer = MultiheadDilatedAttention(32, 4, [8], [1], dtype=torch.bfloat16)
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"query is torch.float64 but the layer's parameters are "
                                        r"torch.bfloat16; cast the input"):  # fmt: skip
        layer(x)
    layer(x.to(torch.bfloat16))
    with pytest.raises(TypeError, match=r"attn_mask is not supported.*key_padding_mask.*is_causal"):
        layer(x.to(torch.bfloat16), attn_mask=torch.ones(16, 16, dtype=torch.bool))
