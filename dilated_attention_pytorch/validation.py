"""Up-front checks of an attention call, with messages that say what to fix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: object, k: object, v: object) -> None:
    """q, k, v must be ``(B, N, H, D)`` tensors of one shape, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape (B, N, H, D), got {type(t).__name__}."
            )
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if q.dim() != 4:
        raise ValueError(
            f"q must have 4 dims (B, N, H, D) (batch, tokens, heads, head_dim), got shape "
            f"{tuple(q.shape)}; if your tensor is (B, H, N, D), pass q.transpose(1, 2)."
        )
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the same shape as q {tuple(q.shape)} (B, N, H, D), got "
                f"{tuple(t.shape)}; cross-attention with other lengths is not supported."
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(
                f"q, k and v must share one dtype, got q {q.dtype} and {name} {t.dtype}; cast them "
                f"with .to(q.dtype)."
            )
        if t.device != q.device:
            raise ValueError(
                f"q, k and v must be on one device, got q on {q.device} and {name} on {t.device}; "
                f"move them with .to(q.device)."
            )
    if q.shape[-1] == 0:
        raise ValueError(
            f"head_dim (the last dim of q, k, v) must be >= 1, got shape {tuple(q.shape)}."
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported dtype {q.dtype}; expected one of {[str(d) for d in SUPPORTED_DTYPES]}."
        )


def check_key_padding_mask(mask: object, q: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"key_padding_mask must be a bool tensor of shape (B, N) or None, got {type(mask).__name__}."
        )
    B, N = q.shape[0], q.shape[1]
    if mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}; "
            f"convert it with mask.bool()."
        )
    if tuple(mask.shape) != (B, N):
        raise ValueError(
            f"key_padding_mask must have shape (B, N) = ({B}, {N}), got {tuple(mask.shape)}."
        )
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {mask.device}.")


def check_probability(name: str, value: object) -> float:
    """A drop probability in ``[0, 1)``; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}.")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}; use 0.0 to disable it.")
    return float(value)


def check_scalars(*, scale: object, dropout_p: object, is_causal: object) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}.")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite float, got {scale}.")
    check_probability("dropout_p", dropout_p)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}.")


def token_major(x: Tensor) -> Tensor:
    """``x`` itself when segment views can read it in place, else a contiguous copy."""
    from .segments import has_token_major_layout

    return x if has_token_major_layout(x) else x.contiguous()
