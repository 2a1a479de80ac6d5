"""Dilated attention inside Hugging Face ``transformers`` models.

:func:`register` adds an attention implementation (and the mask function it needs) to
``transformers``' registries, so that a model built with
``attn_implementation="dilated"`` runs every attention layer through
:func:`~dilated_attention_pytorch.dilated_attention`::

    from transformers import AutoModelForCausalLM, LlamaConfig
    from dilated_attention_pytorch.integrations.transformers import register

    register([2048, 4096, 8192], [1, 2, 4])  # name="dilated"
    model = AutoModelForCausalLM.from_config(LlamaConfig(...), attn_implementation="dilated")

What it supports: grouped-query attention (the model's K/V heads are never repeated),
causal and bidirectional layers, padding masks (a 2-D ``attention_mask``: padded keys
are never attended; positions still count from the first token of the row), packed
batches (``DataCollatorWithFlattening``: documents are told apart by ``position_ids``
restarting at 0, or by its ``cu_seq_lens_q`` / ``cu_seq_lens_k`` when
``return_flash_attn_kwargs=True``), dropout, and generation with a KV cache (each new
token's query attends exactly as in the whole causal call; the step costs a causal call
over the cached length, linear in it). It raises ``ValueError`` for what it cannot do:
sliding windows, logit soft-capping, attention sinks, ``output_attentions=True``, an
already built 4-D mask, and keys of another length than the queries outside generation.

``transformers`` is an optional dependency: ``pip install dilated-attention-pytorch[hf]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..backends import available_backends
from ..functional import dilated_attention
from ..validation import check_backend_name, check_branch_mixing, validate_branches

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dilated_attention_pytorch.integrations.transformers needs Hugging Face "
        "transformers (>= 5.0); install it with `pip install dilated-attention-pytorch[hf]`."
    ) from exc

__all__ = ["register"]


def register(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    name: str = "dilated",
    *,
    branch_mixing: str = "softmax",
    backend: str = "auto",
) -> str:
    """Register dilated attention with ``transformers`` under ``name``; returns ``name``.

    Afterwards ``AutoModelForCausalLM.from_config(config, attn_implementation=name)`` (or
    ``from_pretrained(..., attn_implementation=name)``, or
    ``model.set_attn_implementation(name)``) runs :func:`dilated_attention` with these
    branches in every attention layer. Registering the same name again replaces the
    settings (models already built use the new ones too: the registry is global).

    Args:
        segment_lengths, dilation_rates, branch_mixing, backend: as in
            :func:`~dilated_attention_pytorch.dilated_attention`.
        name: the ``attn_implementation`` name.

    Importing this module without ``transformers`` installed raises ``ImportError`` with
    the install command.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}.")
    ws, rs = validate_branches(segment_lengths, dilation_rates)
    settings = dict(
        segment_lengths=list(ws),
        dilation_rates=list(rs),
        branch_mixing=check_branch_mixing(branch_mixing),
        backend=check_backend_name(backend, available_backends()),
    )
    AttentionInterface.register(
        name, partial(dilated_attention_forward, **settings, registered_name=name)
    )
    # The mask the layers get: the 2-D padding mask (True = token), or None without
    # padding, as for flash attention; causality and documents are handled here.
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def _unsupported(kwargs: dict[str, Any], name: str) -> None:
    checks = (
        ("sliding_window", "a sliding window (set config.sliding_window = None, or keep "
         "those layers on another attention implementation)"),
        ("softcap", "logit soft-capping"),
        ("s_aux", "attention sinks"),
        ("position_bias", "an additive position bias"),
    )  # fmt: skip
    for key, what in checks:
        if kwargs.get(key) is not None:
            raise ValueError(f"attn_implementation={name!r} does not implement {what}.")
    if kwargs.get("output_attentions"):
        raise ValueError(
            "dilated attention never materialises the attention weights; call the model "
            "with output_attentions=False."
        )


def _documents(
    batch: int, length: int, kwargs: dict[str, Any], padded: bool, device: torch.device
) -> Tensor | None:
    """``cu_seqlens`` of a packed batch, or ``None`` when each row is one sequence.

    From ``cu_seq_lens_q``/``_k`` when given, else from ``position_ids`` restarting at 0
    inside a row, but only without a padding mask (``generate`` fills the positions of
    left padding with 1, so a padded row would look packed).
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:
        if cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError(
                "cu_seq_lens_q and cu_seq_lens_k differ: dilated attention packs the same "
                "documents for queries and keys (self-attention)."
            )
        return cu_q
    position_ids = kwargs.get("position_ids")
    if padded or position_ids is None or position_ids.shape[-1] != length:
        return None
    restarts = position_ids[:, 1:] == 0  # a position restarting at 0 inside a row
    if not bool(restarts.any()):
        return None
    if batch != 1:
        raise ValueError(
            f"position_ids restart at 0 inside rows of a batch of {batch}: packed documents "
            f"must form one row (1, total), as DataCollatorWithFlattening makes them; "
            f"flatten the batch or pass a 2-D attention_mask for padded rows."
        )
    starts = torch.nonzero(restarts[0]).flatten() + 1
    bounds = [0, *starts.tolist(), length]
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def _filled_length(
    n_q: int, n_k: int, attention_mask: Tensor | None, position_ids: Tensor | None
) -> int:
    """How many of the ``n_k`` cached keys hold tokens: all of them, except in a static
    cache, whose slots past the tokens seen so far are empty (the 2-D mask, or the last
    query's position, tells how many were seen)."""
    if n_k <= n_q:
        return n_k
    if attention_mask is not None:
        return min(n_k, attention_mask.shape[-1])
    if position_ids is not None:
        return min(n_k, int(position_ids[:, -1].max()) + 1)
    return n_k


def dilated_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    segment_lengths: list[int],
    dilation_rates: list[int],
    branch_mixing: str = "softmax",
    backend: str = "auto",
    registered_name: str = "dilated",
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function ``transformers`` calls: ``query`` ``(B, H, Nq, D)``,
    ``key``/``value`` ``(B, H_kv, Nk, D)`` -> ``((B, Nq, H, D), None)``;
    ``registered_name`` (the ``attn_implementation`` name) appears in its errors."""
    _unsupported(kwargs, registered_name)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"dilated attention takes a 2-D padding mask (B, N), got a {attention_mask.dim()}-D "
            f"attention_mask of shape {tuple(attention_mask.shape)}; let the model build its "
            f"mask with the registered mask function (pass the 2-D attention_mask)."
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, heads, D) views
    B, n_q, H, D = q.shape
    n_k = _filled_length(n_q, k.shape[1], attention_mask, kwargs.get("position_ids"))
    if n_k < k.shape[1]:  # a static cache: only the first n_k slots hold tokens
        k, v = k[:, :n_k], v[:, :n_k]
    if attention_mask is not None:
        attention_mask = attention_mask[:, -n_k:]
    padding = None if attention_mask is None else ~attention_mask.to(torch.bool)
    options = dict(
        is_causal=bool(causal), branch_mixing=branch_mixing, scale=scaling,
        dropout_p=float(dropout), backend=backend,
    )  # fmt: skip
    if n_q == n_k:
        cu_seqlens = _documents(B, n_q, kwargs, padding is not None, q.device)
        if cu_seqlens is not None and padding is not None:
            padding = None if not padding.any() else padding
        out = dilated_attention(
            q, k, v, segment_lengths, dilation_rates, key_padding_mask=padding,
            cu_seqlens=cu_seqlens, **options,
        )  # fmt: skip
        return out, None
    if not causal or n_q > n_k:
        raise ValueError(
            f"dilated attention attends a sequence to itself: got {n_q} queries and {n_k} keys "
            f"in a {'non-causal' if not causal else 'causal'} layer (cross-attention is not "
            f"supported)."
        )
    # Generation with a KV cache: the new queries are the last n_q positions of a causal
    # call over the n_k cached tokens (the earlier queries are zeros and discarded).
    full_q = q.new_zeros(B, n_k, H, D)
    full_q[:, n_k - n_q :] = q
    out = dilated_attention(
        full_q, k, v, segment_lengths, dilation_rates, key_padding_mask=padding, **options
    )
    return out[:, n_k - n_q :], None
