"""Every argument check of the library, with messages that say what to fix.

One rule throughout: a value of the wrong *type* raises ``TypeError``, a value of
the right type but outside what is allowed raises ``ValueError``. Each message says
what was expected, what arrived and how to fix it.

This module imports nothing else from the package, so every layer (plan, backends,
functional, modules, config, factory, ring) can use it.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Sequence

import torch
from numpy import bool_ as np_bool
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BRANCH_MIXINGS = ("softmax", "head_split")
# Largest segment length (and so dilation rate): 2**40 tokens is far beyond any sequence
# that fits in memory, and keeps every stride product (length x token stride) in int64.
MAX_BRANCH_LENGTH = 2**40
# |scale| must be a normal float32: the kernels multiply scores by it in float32 (float64
# inputs excepted), where a larger scale is inf and a smaller one loses precision or is 0.
SCALE_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def _describe(value: object) -> str:
    """``value`` for an error message: type and a short repr (a tensor by shape and dtype)."""
    if isinstance(value, Tensor):
        return f"Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


# --------------------------------------------------------------------------- scalars


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}.")
    return value


def check_is_causal(is_causal: object) -> bool:
    """``is_causal``: a bool; a tensor there is a padding mask passed in its place."""
    if isinstance(is_causal, Tensor):
        raise TypeError(
            f"is_causal must be a bool, got {_describe(is_causal)}; a (B, N) padding mask goes "
            f"in key_padding_mask=... (attention modules over (B, N, H, D) tensors take "
            f"is_causal as their 4th positional argument)."
        )
    return check_bool("is_causal", is_causal)


def is_int(value: object) -> bool:
    """An integer: ``int`` or another integral type such as ``numpy.int64``, not ``bool``
    (an int subclass) nor ``numpy.bool_``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np_bool))


def check_positive_int(name: str, value: object) -> int:
    """A positive ``int`` (or numpy integer; ``bool`` is rejected although it is an int
    subclass), returned as ``int``."""
    if not is_int(value):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}.")
    return int(value)


def check_optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else check_positive_int(name, value)


def check_num_kv_heads(num_kv_heads: object, num_heads: int) -> int:
    """The K/V head count of grouped-query attention: a positive divisor of ``num_heads``
    (``None``: ``num_heads``)."""
    if num_kv_heads is None:
        return num_heads
    value = check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % value != 0:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"num_kv_heads must divide num_heads ({num_heads}) for grouped-query attention "
            f"(query head h reads K/V head h // (num_heads / num_kv_heads)), got {value}; "
            f"use one of {divisors}."
        )
    return value


def check_positive_float(name: str, value: object) -> float:
    """A positive finite ``float`` (ints accepted, ``bool`` rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value}.")
    return float(value)


def check_probability(name: str, value: object) -> float:
    """A drop probability in ``[0, 1)``; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}.")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}; use 0.0 to disable it.")
    return float(value)


def check_scale(scale: object) -> float | None:
    """``None`` (meaning ``D ** -0.5``) or a finite nonzero real number; returns it as a float.

    Either sign is allowed (``softmax(scale * q.k)`` is defined for any real scale; a
    negative one favours dissimilar keys). Zero, ``inf`` and ``nan`` are rejected, and so
    is a magnitude outside float32's normal range :data:`SCALE_RANGE` (about
    ``1.2e-38 .. 3.4e38``): the kernels multiply scores by the scale in float32, where
    such a scale is ``inf`` or ``0``. A large scale inside the range (``1e30``) is a valid,
    nearly hard-max attention; scores whose scaled value overflows float32 are the
    caller's to avoid, as with any float32 arithmetic.
    """
    if scale is None:
        return None
    if isinstance(scale, (bool, Tensor)) or not isinstance(scale, numbers.Real):
        hint = "; pass a Python float (scale.item())" if isinstance(scale, Tensor) else ""
        raise TypeError(
            f"scale must be a real number (a float) or None for head_dim ** -0.5, got "
            f"{_describe(scale)}{hint}."
        )
    try:
        value = float(scale)
    except OverflowError:  # an int too large for a float
        value = math.inf if scale > 0 else -math.inf
    if math.isnan(value) or value == 0.0:
        raise ValueError(
            f"scale must be a finite nonzero number, got {value}; pass None for the default "
            f"head_dim ** -0.5."
        )
    low, high = SCALE_RANGE
    if not low <= abs(value) <= high:
        raise ValueError(
            f"scale must be finite with {low:.3g} <= |scale| <= {high:.3g} (float32's normal "
            f"range: scores are multiplied by it in float32), got {_describe(scale)}; pass "
            f"None for the default head_dim ** -0.5."
        )
    return value


def check_scalars(*, scale: object, dropout_p: object, is_causal: object) -> None:
    """The scalar options of an attention call."""
    check_scale(scale)
    check_probability("dropout_p", dropout_p)
    check_is_causal(is_causal)


def check_dropout(dropout: object) -> float:
    """A module's ``dropout``: a float in ``[0, 1)``."""
    return check_probability("dropout", dropout)


def check_gamma_init(gamma_init: object) -> float:
    return check_positive_float("gamma_init", gamma_init)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be one of {list(choices)}, got {type(value).__name__} {value!r}."
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


# --------------------------------------------------------------------------- branches


def check_int_list(name: str, values: object) -> tuple[int, ...]:
    """A list or tuple of positive ints, returned as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a list or tuple of positive ints, got {type(values).__name__} "
            f"{values!r}; pass e.g. {name}=[2048, 4096]."
        )
    out = []
    for i, v in enumerate(values):
        # bool is an int subclass; reject it explicitly (numpy integers are welcome).
        if not is_int(v):
            raise TypeError(
                f"{name}[{i}] must be an int, got {type(v).__name__} {v!r}; "
                f"convert it with int() or fix the config."
            )
        if v <= 0:
            raise ValueError(
                f"{name}[{i}] must be a positive int, got {v}; every segment length and "
                f"dilation rate must be >= 1."
            )
        if v > MAX_BRANCH_LENGTH:
            raise ValueError(
                f"{name}[{i}] must be at most 2**40 = {MAX_BRANCH_LENGTH}, got {v}; every "
                f"segment length and dilation rate must satisfy 1 <= value <= 2**40 (a "
                f"segment longer than the sequence covers all of it, so the sequence "
                f"length is long enough)."
            )
        out.append(int(v))
    return tuple(out)


def validate_branches(
    segment_lengths: object, dilation_rates: object
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the branch lists ``(w_i)``, ``(r_i)`` and return them as int tuples.

    Raises:
        TypeError: a list is not a sequence of ints.
        ValueError: an empty list, unequal lengths, a non-positive value or ``r > w``.
    """
    ws = check_int_list("segment_lengths", segment_lengths)
    rs = check_int_list("dilation_rates", dilation_rates)
    if len(ws) == 0 or len(rs) == 0:
        raise ValueError(
            f"segment_lengths and dilation_rates must be non-empty, got {list(ws)} and "
            f"{list(rs)}; give at least one branch, e.g. segment_lengths=[N], dilation_rates=[1]."
        )
    if len(ws) != len(rs):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length (one dilation rate "
            f"per segment length), got {len(ws)} segment lengths {list(ws)} and {len(rs)} "
            f"dilation rates {list(rs)}."
        )
    for i, (w, r) in enumerate(zip(ws, rs)):
        if r > w:
            raise ValueError(
                f"branch {i}: dilation rate {r} is larger than its segment length {w}; "
                f"each dilation rate must satisfy 1 <= r <= w."
            )
    return ws, rs


def check_branch_mixing(branch_mixing: object) -> str:
    return check_choice("branch_mixing", branch_mixing, BRANCH_MIXINGS)


# --------------------------------------------------------------------------- tensors


def check_not_tracing() -> None:
    """Refuse ``torch.jit.trace``, which would fail later with a misleading message.

    Tracing turns every shape into a tensor, while the branch schedule is built in
    Python from the head count and sequence length.
    """
    if torch.jit.is_tracing():
        raise TypeError(
            "torch.jit.trace cannot record dilated attention: its branch schedule is built "
            "in Python from the tensor shapes, which tracing turns into tensors. Use "
            "torch.compile(module) instead, or run the module eagerly."
        )


def check_qkv(q: object, k: object, v: object, *, grouped_query: bool = False) -> None:
    """q ``(B, N, H, D)``; k and v of q's shape, or with ``grouped_query`` ``(B, N, H_kv, D)``
    with ``H_kv`` dividing ``H`` (grouped-query attention when ``H_kv < H``); one dtype
    and device."""
    check_not_tracing()
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
    B, N, H, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, N, D):
            raise ValueError(
                f"{name} must have shape (B, N, H_kv, D) = ({B}, {N}, H_kv, {D}) like q "
                f"{tuple(q.shape)}, got {tuple(t.shape)}; cross-attention with other lengths "
                f"is not supported."
            )
        if not grouped_query and t.shape[2] != H:
            raise ValueError(
                f"{name} must have the same shape as q {tuple(q.shape)} (B, N, H, D), got "
                f"{tuple(t.shape)}; this attention has no grouped-query form: repeat the K/V "
                f"heads first ({name}.repeat_interleave(H // H_kv, dim=2))."
            )
        if t.shape[2] == 0 or H % t.shape[2] != 0:
            raise ValueError(
                f"{name} has {t.shape[2]} heads, which must divide q's {H} heads (grouped-query "
                f"attention: query head h reads K/V head h // (H / H_kv)); got {name} of shape "
                f"{tuple(t.shape)} and q of shape {tuple(q.shape)}."
            )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have one shape (B, N, H_kv, D), got k {tuple(k.shape)} and v "
            f"{tuple(v.shape)}."
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


def check_key_padding_mask(mask: object, q: Tensor, what: str = "(B, N)") -> Tensor | None:
    """A ``(B, N)`` bool mask on q's device; ``what`` names the expected shape in errors.

    Returns the mask in the token-major layout the kernels read (``mask`` itself when it
    is contiguous, else a contiguous copy, e.g. of a transposed ``(N, B)`` tensor or an
    expanded ``(1, N)`` one), or ``None``.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        hint = "; for causal attention pass is_causal=True" if isinstance(mask, bool) else ""
        raise TypeError(
            f"key_padding_mask must be a bool tensor of shape {what} or None, got "
            f"{type(mask).__name__}{hint}."
        )
    B, N = q.shape[0], q.shape[1]
    if mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}; "
            f"convert it with mask.bool()."
        )
    if tuple(mask.shape) != (B, N):
        raise ValueError(
            f"key_padding_mask must have shape {what} = ({B}, {N}), the batch and tokens of "
            f"q, got {tuple(mask.shape)}."
        )
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {mask.device}.")
    return mask.contiguous()


def check_cu_seqlens_form(cu_seqlens: object, q: Tensor, key_padding_mask: object) -> None:
    """What can be checked of ``cu_seqlens`` without reading its values (under
    ``torch.compile`` the values are read inside the attention operator)."""
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask and cu_seqlens cannot be combined: with packed documents "
            "there is no padding to mask (each document is attended on its own); drop the "
            "padding tokens from the packed batch, or pass a padded (B, N) batch with a "
            "key_padding_mask instead of cu_seqlens."
        )
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(
            f"cu_seqlens must be a 1-D int32 or int64 tensor of document offsets "
            f"[0, n_0, n_0 + n_1, ..., total], got {type(cu_seqlens).__name__}."
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 or int64 tensor of document offsets, got shape "
            f"{tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}."
        )
    if q.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens, q, k, v hold the packed documents as one batch row (1, total, "
            f"H, D), got q of shape {tuple(q.shape)}; pack the batch with e.g. "
            f"q.reshape(1, -1, H, D) and offsets of every sequence."
        )


def check_cu_seqlens(
    cu_seqlens: object, max_seqlen: object, q: Tensor, key_padding_mask: object
) -> list[int]:
    """The document lengths of a packed batch, from flash-attn's ``cu_seqlens`` convention.

    ``cu_seqlens``: 1-D int32/int64 tensor ``[0, n_0, n_0 + n_1, ..., total]`` (read on
    the host), ``q`` ``(1, total, H, D)``; ``max_seqlen``: ``None`` or an int at least the
    longest document.
    """
    check_cu_seqlens_form(cu_seqlens, q, key_padding_mask)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    total = q.shape[1]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the packed length {total} (q's dim 1), "
            f"with one more entry than documents, got {bounds[:4]}{'...' if len(bounds) > 4 else ''}"
            f"{' ending at ' + str(bounds[-1]) if bounds else ''}."
        )
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(lengths) < 0:
        i = min(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(
            f"cu_seqlens must not decrease, got {bounds[i]} then {bounds[i + 1]} (entries "
            f"{i} and {i + 1})."
        )
    if max_seqlen is not None:
        longest = max(lengths)
        if (
            isinstance(max_seqlen, Tensor)
            and max_seqlen.numel() == 1
            and not max_seqlen.is_floating_point()
        ):
            max_seqlen = int(max_seqlen.item())  # flash-attn callers pass a 0-dim tensor too
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(
                f"max_seqlen must be an int (or a one-element integer tensor), got "
                f"{type(max_seqlen).__name__} {max_seqlen!r}."
            )
        if max_seqlen < longest:
            raise ValueError(
                f"max_seqlen={max_seqlen} is shorter than the longest document in cu_seqlens "
                f"({longest} tokens); pass max_seqlen >= {longest} or leave it None."
            )
    return lengths


def check_embedding_input(name: str, x: object, embed_dim: int) -> Tensor:
    """A multi-head layer's input: a ``(B, N, E)`` tensor with ``E == embed_dim``."""
    check_not_tracing()
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, N, E), got {type(x).__name__}."
        )
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(
            f"{name} must have shape (B, N, E) with E = embed_dim = {embed_dim} "
            f"(batch-first), got {tuple(x.shape)}; if your tensor is (N, B, E), pass "
            f"{name}.transpose(0, 1)."
        )
    return x


def check_input_dtype(name: str, x: Tensor, param_dtype: torch.dtype) -> None:
    """A multi-head layer's input must be floating point and, outside ``torch.autocast``,
    of the dtype of the layer's parameters."""
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (B, N, E), got dtype {x.dtype}; embed "
            f"token ids first (e.g. with nn.Embedding), or cast with {name}.to({param_dtype})."
        )
    if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} is {x.dtype} but the layer's parameters are {param_dtype}; cast "
            f"the input ({name}.to({param_dtype})) or the layer "
            f"(layer.to({x.dtype})), or run under torch.autocast."
        )


# --------------------------------------------------------------------------- modules


def check_head_split(embed_dim: object, num_heads: object) -> int:
    """``embed_dim`` and ``num_heads`` positive ints (numpy integers too),
    ``embed_dim % num_heads == 0``; returns head_dim."""
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
        if value <= 0:  # type: ignore[operator]
            raise ValueError(f"{name} must be a positive int, got {value}.")
    embed_dim, num_heads = int(embed_dim), int(num_heads)  # type: ignore[call-overload]
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and "
            f"num_heads={num_heads} (head_dim would be {embed_dim / num_heads:g}); choose "
            f"num_heads among the divisors of embed_dim."
        )
    return embed_dim // num_heads


def check_backend_name(backend: object, valid: Sequence[str]) -> str:
    """``"auto"`` or one of the registered backend names ``valid``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__} {backend!r}.")
    if backend == "triton" and backend not in valid:
        raise ValueError(
            "backend='triton' needs Triton, which is not installed: install it with "
            "pip install 'dilated-attention-pytorch[triton]' (Triton runs on NVIDIA GPUs, and "
            f"on the CPU only through TRITON_INTERPRET=1), or use one of {['auto', *valid]}."
        )
    if backend != "auto" and backend not in valid:
        raise ValueError(f"unknown backend {backend!r}; valid backends are {['auto', *valid]}.")
    return backend


def check_ring_size(ring_size: object) -> int | None:
    """``None`` (the whole process group) or a positive int."""
    return check_optional_positive_int("ring_size", ring_size)


def _user_stacklevel() -> int:
    """``stacklevel`` that makes a ``warnings.warn`` in the calling function point at the
    first frame outside this package and torch: the user's call, whatever the path."""
    skip = (
        os.path.dirname(os.path.abspath(__file__)) + os.sep,
        os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    )
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _offsets_text(first: int, stop: int) -> str:
    """The offsets ``first .. stop - 1``, listed or elided: ``1, 2, 3`` or ``4, 5, ..., 15``."""
    if stop - first <= 4:
        return ", ".join(str(o) for o in range(first, stop))
    return f"{first}, {first + 1}, ..., {stop - 1}"


def warn_uncovered_positions(
    branches: Sequence[tuple[int, int, int, int]],
    *,
    num_heads: int,
    branch_mixing: str,
    examples: Sequence[int],
    period: int,
    per_period: int | None,
    heads_needed: int,
) -> None:
    """Warn that some positions are attended by no head in any branch (their output is 0).

    Args:
        branches: per branch ``(w, r, heads running it, offsets used)``; the used offsets
            are ``0 .. used - 1`` (the plan's rule), the others no head attends.
        examples: the first uncovered positions; ``per_period`` of every ``period``
            positions are uncovered (``None``: the period is too long to count).
        heads_needed: the fewest heads with which every offset of every branch has a head.
    """
    if torch.compiler.is_compiling():
        return  # a warning would break the compiled graph; eager calls still warn
    ws = [w for w, _, _, _ in branches]
    rs = [r for _, r, _, _ in branches]
    count = "" if per_period is None else f"{per_period} of every {period} positions, "
    rules = []
    for i, (w, r, heads, used) in enumerate(branches):
        position = f"p mod {r}" if w % r == 0 else f"(p mod {w}) mod {r}"
        rules.append(
            f"branch {i} (w={w}, r={r}, run by {heads} head{'s' if heads != 1 else ''}): "
            f"{position} in {{{_offsets_text(used, r)}}}"
        )
    per_head = (
        "max(dilation_rates)"
        if branch_mixing == "softmax"
        else "every branch's group of heads then has one head per offset"
    )
    warnings.warn(
        f"dilated attention with {num_heads} head{'s' if num_heads != 1 else ''}, "
        f"segment_lengths={ws}, dilation_rates={rs} and branch_mixing={branch_mixing!r} "
        f"leaves some positions attended by no head, so their output is 0 for every head "
        f"({count}e.g. positions {', '.join(str(p) for p in examples)}). These are the "
        f"positions p whose offset in every branch is one no head uses: "
        + "; ".join(rules)
        + f". To cover every position use at least {heads_needed} heads ({per_head}), or "
        f"fewer or less dilated branches (a branch with dilation rate 1 covers every "
        f"position).",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def warn_branches_without_heads(
    branches: Sequence[tuple[int, int, int]], *, num_heads: int
) -> None:
    """Warn that ``"head_split"`` mixing leaves some branches with no head (``num_heads``
    smaller than the branch count): those branches are not computed at all.

    Args:
        branches: per branch ``(w, r, heads running it)``.
    """
    if torch.compiler.is_compiling():
        return  # a warning would break the compiled graph; eager calls still warn
    idle = [f"branch {i} (w={w}, r={r})" for i, (w, r, heads) in enumerate(branches) if heads == 0]
    if not idle:
        return
    warnings.warn(
        f"branch_mixing='head_split' with {num_heads} head{'s' if num_heads != 1 else ''} "
        f"and {len(branches)} branches gives no head to {', '.join(idle)}: "
        f"{'it is' if len(idle) == 1 else 'they are'} not computed. Use at least "
        f"{len(branches)} heads (one group of heads per branch), fewer branches, or "
        f"branch_mixing='softmax' (every head runs every branch).",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def warn_if_transposed(q: Tensor, segment_lengths: Sequence[int]) -> None:
    """Warn when ``q`` looks like ``(B, H, N, D)`` instead of ``(B, N, H, D)``.

    The sign: fewer "tokens" (dim 1) than "heads" (dim 2), every segment longer than
    the sequence, and dim 2 as long as a segment (a real head count is not). The call
    is valid (one short segment per branch), so this is a warning, not an error; a
    single token (or none) never warns.
    """
    if torch.compiler.is_compiling():
        return  # a warning would break the compiled graph; eager calls still warn
    N, H = q.shape[1], q.shape[2]
    if 2 <= N < H and all(w > N for w in segment_lengths) and H >= min(segment_lengths):
        warnings.warn(
            f"q has shape {tuple(q.shape)}, read as (B, N, H, D): {N} tokens and {H} heads, "
            f"and every segment length {list(segment_lengths)} exceeds the {N} tokens. If "
            f"your tensors are (B, H, N, D), the layout of "
            f"torch.nn.functional.scaled_dot_product_attention, pass q.transpose(1, 2) "
            f"(and k, v likewise) and transpose the output back.",
            UserWarning,
            stacklevel=3,
        )
