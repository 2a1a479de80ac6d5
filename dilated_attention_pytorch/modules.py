"""Thin ``nn.Module`` wrappers over :func:`~dilated_attention_pytorch.dilated_attention`.

They own hyper-parameters and projections; the maths lives in :mod:`.functional`
(``dilated_attention``). Both modules are batch-first: tensors are ``(B, N, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .backends import available_backends
from .backends.base import AttentionCall, choose_backend
from .decoding import DilatedKVCache, cached_dilated_attention
from .functional import dilated_attention
from .memory import get_memory_estimate
from .plan import DilatedPlan, make_plan
from .projected import projected_attention
from .rotary import RotaryAttention
from .validation import (
    check_backend_name,
    check_bool,
    check_branch_mixing,
    check_dropout,
    check_embedding_input,
    check_gamma_init,
    check_head_split,
    check_input_dtype,
    check_is_causal,
    check_num_kv_heads,
    check_scale,
    validate_branches,
)

__all__ = ["DilatedAttention", "MultiheadDilatedAttention"]


class DilatedAttention(nn.Module):
    """LongNet dilated attention over already projected ``(B, N, H, D)`` tensors.

    No parameters: a module form of :func:`~dilated_attention_pytorch.dilated_attention`
    that stores the branch schedule and applies ``dropout`` only in training mode.

    Args:
        segment_lengths: segment length ``w`` of each branch.
        dilation_rates: dilation rate ``r`` of each branch, ``1 <= r <= w``.
        branch_mixing: ``"softmax"`` (every head runs every branch, mixed by their
            softmax denominators) or ``"head_split"`` (heads split across branches).
        dropout: drop probability of the joint attention probabilities, training only.
        scale: score scale, default ``D ** -0.5``; any finite nonzero real number of
            either sign with ``|scale|`` in float32's normal range.
        backend: ``"auto"`` or a registered backend name.

    Shapes:
        q: ``(B, N, H, D)``; k, v: ``(B, N, H_kv, D)`` with ``H_kv`` dividing ``H``
        (``H_kv = H`` without grouped-query attention); output ``(B, N, H, D)``. Called as
        ``attn(q, k, v, is_causal=False, key_padding_mask=None)``: the 4th positional
        argument is ``is_causal``, the order of the keywords of
        :func:`~dilated_attention_pytorch.dilated_attention`.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        branch_mixing: str = "softmax",
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = validate_branches(
            segment_lengths, dilation_rates
        )
        self.branch_mixing = check_branch_mixing(branch_mixing)
        self.dropout = check_dropout(dropout)
        self.scale = check_scale(scale)
        self.backend = check_backend_name(backend, available_backends())

    def plan(self, num_heads: int, num_kv_heads: int | None = None) -> DilatedPlan:
        """The branch plan for ``num_heads`` heads (which heads run which branch, with
        which offset, reading which of ``num_kv_heads`` K/V heads). Built once per
        configuration; a ``UserWarning`` then says which positions no head attends, if
        any (their output would be 0)."""
        return make_plan(
            self.segment_lengths, self.dilation_rates, num_heads, self.branch_mixing, num_kv_heads
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        *,
        cache: DilatedKVCache | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        """Attend ``q`` to ``k``/``v``.

        Args:
            q, k, v: ``(B, N, H, D)``, one dtype and device.
            is_causal: query ``p`` only sees keys ``p' <= p`` (also the 4th positional
                argument).
            key_padding_mask: ``(B, N)`` bool, ``True`` marks padding keys; any layout
                (a transposed or expanded mask is copied).
            cache: a :class:`~dilated_attention_pytorch.decoding.DilatedKVCache` from
                :meth:`new_cache` for incremental decoding: ``q, k, v`` are then the
                next tokens (the whole prompt first), ``is_causal`` must be ``True``.
            cu_seqlens, max_seqlen: packed documents in a ``(1, total, H, D)`` batch, as in
                :func:`~dilated_attention_pytorch.dilated_attention` (each document is its
                own sequence). ``MultiheadDilatedAttention`` passes them on:
                ``layer(x, cu_seqlens=cu_seqlens)``.

        Returns:
            ``(B, N, H, D)`` in ``q.dtype``.
        """
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError(
                    "a decoding cache holds one sequence per batch row; decode packed "
                    "documents as a padded batch (B, N) instead of cu_seqlens."
                )
            self._check_cache(cache, is_causal, key_padding_mask)
            return cached_dilated_attention(q, k, v, cache)
        return dilated_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            is_causal=is_causal,
            branch_mixing=self.branch_mixing,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            key_padding_mask=key_padding_mask,
            backend=self.backend,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )

    def _runs_projected_node(self) -> bool:
        """Whether :meth:`_projected_call` takes this module's calls on shards or one
        device (a subclass whose forward wraps more around the attention says no)."""
        return True

    def _projected_call(
        self,
        x: Tensor,
        weights: tuple[Tensor, Tensor, Tensor],
        biases: tuple[Tensor | None, Tensor | None, Tensor | None],
        *,
        num_heads: int,
        num_kv_heads: int,
        is_causal: bool,
        key_padding_mask: Tensor | None,
        rotary: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor | None:
        """This attention of the multi-head layer's projections of ``x`` ``(B, N, E)``, as
        one node that recomputes q, k, v in the backward
        (:func:`~dilated_attention_pytorch.projected.projected_attention`), as
        ``(B, N, H, D)``; ``None`` when the call is not one the node reproduces (the layer
        then runs the projections and :meth:`forward`). A class that defines this method
        itself promises that the node computes what its ``forward`` computes."""
        if not set(kwargs) <= {"cu_seqlens", "max_seqlen"}:
            return None
        return projected_attention(
            x, weights, biases, num_heads=num_heads, num_kv_heads=num_kv_heads,
            segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            branch_mixing=self.branch_mixing, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
            is_causal=check_is_causal(is_causal), key_padding_mask=key_padding_mask,
            cu_seqlens=kwargs.get("cu_seqlens"), max_seqlen=kwargs.get("max_seqlen"),
            rotary=rotary,
        )  # fmt: skip

    def _check_cache(self, cache: object, is_causal: bool, key_padding_mask: object) -> None:
        if not isinstance(cache, DilatedKVCache):
            raise TypeError(f"cache must be a DilatedKVCache, got {type(cache).__name__}.")
        if not is_causal or key_padding_mask is not None:
            raise ValueError(
                "a decoding cache needs is_causal=True and no key_padding_mask (it keeps "
                "what later tokens of a causal sequence can see)."
            )
        if self.training and self.dropout > 0.0:
            raise ValueError(
                f"decoding with a cache does not apply dropout (this module has "
                f"dropout={self.dropout} and is in training mode); call .eval() first."
            )
        plan = cache.plan
        mine = (self.segment_lengths, self.dilation_rates, self.branch_mixing, self.scale)
        theirs = (plan.segment_lengths, plan.dilation_rates, plan.branch_mixing, cache.scale)
        if tuple(map(tuple, mine[:2])) + mine[2:] != tuple(map(tuple, theirs[:2])) + theirs[2:]:
            raise ValueError(
                f"the cache was made for segment_lengths={list(plan.segment_lengths)}, "
                f"dilation_rates={list(plan.dilation_rates)}, "
                f"branch_mixing={plan.branch_mixing!r}, scale={cache.scale}, not this module's "
                f"settings {list(self.segment_lengths)}, {list(self.dilation_rates)}, "
                f"{self.branch_mixing!r}, scale={self.scale}; use this module's new_cache()."
            )

    def new_cache(self, num_heads: int, num_kv_heads: int | None = None) -> DilatedKVCache:
        """An empty decoding cache for this attention with ``num_heads`` query heads and
        ``num_kv_heads`` K/V heads (default ``num_heads``)."""
        return DilatedKVCache(
            self.segment_lengths, self.dilation_rates, num_heads,
            branch_mixing=self.branch_mixing, scale=self.scale, backend=self.backend,
            num_kv_heads=num_kv_heads,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, "
            f"dilation_rates={list(self.dilation_rates)}, branch_mixing={self.branch_mixing!r}, "
            f"dropout={self.dropout}, scale={self.scale}, backend={self.backend!r}"
        )

    def memory_ring_size(self) -> int:
        """Ranks the sequence is split over, for :meth:`get_memory_estimate` (1 here)."""
        return 1

    def get_memory_estimate(
        self,
        seq_len: int,
        batch_size: int = 1,
        num_heads: int = 8,
        head_dim: int = 64,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Per-device bytes of one forward+backward of this module (no tensor is allocated).

        :func:`~dilated_attention_pytorch.get_memory_estimate` with this module's
        schedule, mixing, ring size (:meth:`memory_ring_size`) and backend
        (``"auto"`` is counted as the backend ``auto`` would run for this
        forward+backward: ``"triton"`` on one CUDA device when Triton is installed and
        takes the dtype, head dim and dropout (dropout counts in training mode only),
        else ``"pytorch"``, which also runs a ring's blocks; pass ``backend=`` to count
        another). ``kwargs`` are its other keywords
        (``dtype``, ``device`` (``"cuda"`` by default; ``"cpu"`` for a CPU run),
        ``num_kv_heads`` (grouped-query attention: k and v with fewer heads),
        ``is_causal`` (causal calls; the Triton backend then runs every branch on its
        own), ``already_split``, ``embed_dim``, ...).
        """
        return get_memory_estimate(
            seq_len,
            batch_size,
            num_heads,
            head_dim,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            ring_size=self.memory_ring_size(),
            branch_mixing=self.branch_mixing,
            **{**kwargs, "backend": self._estimated_backend(num_heads, head_dim, kwargs)},
        )

    def _estimated_backend(self, num_heads: int, head_dim: int, kwargs: dict) -> str:
        """The backend :meth:`get_memory_estimate` counts: ``kwargs["backend"]`` when given,
        else this module's, with ``"auto"`` resolved as for a forward+backward call in the
        module's current mode (dropout counts only in training mode)."""
        if "backend" in kwargs:
            return kwargs["backend"]
        if self.backend != "auto":
            return self.backend
        if self.memory_ring_size() > 1:  # the ring's "auto" runs the pytorch backend's blocks
            return "pytorch"
        dtype, device = kwargs.get("dtype", torch.bfloat16), kwargs.get("device", "cuda")
        try:
            on_cuda = (
                isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"
            )
        except RuntimeError:  # not a device name: get_memory_estimate reports it
            on_cuda = False
        if not (
            on_cuda
            and isinstance(dtype, torch.dtype)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in (num_heads, head_dim))
            and min(num_heads, head_dim) >= 1
        ):
            return "pytorch"  # the CPU, or an argument get_memory_estimate reports
        try:
            plan = make_plan(
                self.segment_lengths, self.dilation_rates, num_heads, self.branch_mixing,
                kwargs.get("num_kv_heads"),
            )  # fmt: skip
        except (TypeError, ValueError):  # get_memory_estimate reports it
            return "pytorch"
        call = AttentionCall(
            device_type="cuda",
            dtype=dtype,
            head_dim=head_dim,
            is_causal=False,
            dropout=self.training and self.dropout > 0.0,
            key_padding_mask=False,
            plan=plan,
            requires_grad=bool(kwargs.get("with_backward", True)),
        )
        try:
            return choose_backend("auto", call).name
        except ValueError:  # no backend takes the dtype: get_memory_estimate reports it
            return "pytorch"


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own."""
    return any(
        getattr(module, name, None)
        for name in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        )
    )  # fmt: skip


def _global_module_hooks() -> bool:
    """Whether hooks registered for every module (``nn.modules.module``) are set."""
    return any(
        getattr(nn.modules.module, name, None)
        for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )  # fmt: skip


class MultiheadDilatedAttention(nn.Module):
    """Multi-head attention layer over ``(B, N, E)`` inputs, batch-first.

    ``out = out_proj(norm(attention(q_proj(query), k_proj(key), v_proj(value))))``
    where the projections give ``num_heads`` query heads (and ``num_kv_heads`` key and
    value heads) of size ``embed_dim // num_heads``, ``attention`` maps ``(B, N, H, D)``
    q and ``(B, N, H_kv, D)`` k/v to ``(B, N, H, D)`` (by default a
    :class:`DilatedAttention` built from ``segment_lengths`` and ``dilation_rates``)
    and ``norm`` is the LongNet/MAGNETO sub-LayerNorm (identity when ``layer_norm=False``).

    The layer owns the projections, the norm and their initialisation; *how* attention
    is computed is the inner module's business. Pass ``attention=`` to use another
    one (the ring, a Hilbert-ordered or block-sparse attention, or your own module
    called as ``attention(q, k, v, *, is_causal, key_padding_mask)``).

    Initialisation follows MAGNETO (arXiv 2210.06423): xavier-normal weights and zero
    biases, with the ``v_proj`` and ``out_proj`` weights' gain set to ``gamma_init``
    (pass the depth-dependent value of your model; ``1.0`` is plain xavier).

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: number of heads ``H``. In ``"softmax"`` mode ``H`` smaller than the
            largest dilation rate is allowed, but offsets ``>= H`` then go unused; when
            that leaves positions attended by no head in any branch (their output is 0),
            construction warns, naming them and the fix.
        num_kv_heads: key/value heads ``H_kv`` for grouped-query (``1 < H_kv < H``) or
            multi-query (``H_kv = 1``) attention; must divide ``num_heads``. Query head
            ``h`` reads K/V head ``h // (H / H_kv)``; ``k_proj`` and ``v_proj`` then map
            ``E`` to ``H_kv * D`` features, and no K/V head is ever copied. ``None``
            (default): ``num_heads``.
        segment_lengths, dilation_rates, branch_mixing, dropout, scale, backend: the
            keywords of the default inner :class:`DilatedAttention` (``scale`` defaults
            to ``(E // H) ** -0.5``). Leave them unset when passing ``attention=``.
        attention: the inner attention module; built from the arguments above when
            ``None``.
        bias: add biases to the four projections.
        layer_norm: apply the sub-LayerNorm before ``out_proj``.
        recompute_qkv: keep only the input, not the projected q, k, v, for the backward,
            which recomputes them a few heads at a time (three more projection matmuls;
            the backward never holds q, k, v, their gradients and the attention's fp32
            accumulators for all heads at once: the estimated training peak in bf16 is
            about half on the ``pytorch`` backend and two thirds on Triton). Applies to
            self-attention (``key`` and ``value`` the query or ``None``) with plain
            ``nn.Linear`` projections and, as the inner attention (or inside
            :class:`~dilated_attention_pytorch.models.RotaryAttention`, as in
            ``LongNetLM``), the default :class:`DilatedAttention`, or a
            ``StandardRingAttention`` or ``DistributedRingAttention`` (without
            ``use_checkpointing``) called on shards (``already_split=True``, as in
            ``RingMultiheadDilatedAttention`` and ``parallelize_longnet``), without
            module hooks on them and without autocast, eager or under
            ``torch.compile``; other calls run the projections and the attention as
            separate autograd nodes, with the same results. The node keeps the input
            ``x`` for the backward even when the projections are frozen.
        gamma_init: MAGNETO gain of the ``v_proj`` and ``out_proj`` weights.
        device, dtype: of the parameters.

    Shapes:
        query, key, value: ``(B, N, E)``; output ``((B, N, E), None)``. The positional
        order is ``nn.MultiheadAttention``'s: ``layer(query, key, value,
        key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        *,
        num_kv_heads: int | None = None,
        attention: nn.Module | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        branch_mixing: str = "softmax",
        layer_norm: bool = True,
        gamma_init: float = 1.0,
        scale: float | None = None,
        backend: str = "auto",
        recompute_qkv: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.recompute_qkv = check_bool("recompute_qkv", recompute_qkv)
        self.head_dim = check_head_split(embed_dim, num_heads)
        self.embed_dim = int(embed_dim)  # type: ignore[call-overload]  # numpy ints too
        self.num_heads = int(num_heads)  # type: ignore[call-overload]
        self.num_kv_heads = check_num_kv_heads(num_kv_heads, self.num_heads)
        self.gamma_init = check_gamma_init(gamma_init)
        check_bool("bias", bias)
        check_bool("layer_norm", layer_norm)
        if attention is None:
            if segment_lengths is None or dilation_rates is None:
                raise TypeError(
                    "MultiheadDilatedAttention needs segment_lengths and dilation_rates (e.g. "
                    "segment_lengths=[2048, 4096], dilation_rates=[1, 2]) or an attention= module."
                )
            attention = DilatedAttention(
                segment_lengths,
                dilation_rates,
                branch_mixing=branch_mixing,
                dropout=dropout,
                scale=scale,
                backend=backend,
            )
        else:
            if not isinstance(attention, nn.Module):
                raise TypeError(
                    f"attention must be an nn.Module called as attention(q, k, v, *, is_causal, "
                    f"key_padding_mask), got {type(attention).__name__}."
                )
            given = {
                "segment_lengths": segment_lengths is not None,
                "dilation_rates": dilation_rates is not None,
                "dropout": dropout != 0.0,
                "branch_mixing": branch_mixing != "softmax",
                "scale": scale is not None,
                "backend": backend != "auto",
            }
            clash = [name for name, set_ in given.items() if set_]
            if clash:
                raise ValueError(
                    f"{clash} configure the inner attention, but attention= was passed too; "
                    f"set them on the attention module instead."
                )
        self.attention = attention
        if isinstance(attention, DilatedAttention):
            attention.plan(num_heads, self.num_kv_heads)  # warns now if a position gets no head
        factory = {"device": device, "dtype": dtype}
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm: nn.Module = nn.LayerNorm(embed_dim, **factory) if layer_norm else nn.Identity()
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    @property
    def layer_norm(self) -> bool:
        return isinstance(self.norm, nn.LayerNorm)

    def reset_parameters(self) -> None:
        """MAGNETO initialisation: xavier-normal, gain ``gamma_init`` on ``v_proj``/``out_proj``."""
        for proj, gain in (
            (self.q_proj, 1.0),
            (self.k_proj, 1.0),
            (self.v_proj, self.gamma_init),
            (self.out_proj, self.gamma_init),
        ):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        is_causal: bool,
        key_padding_mask: Tensor | None,
        **attention_kwargs: Any,
    ) -> Tensor:
        """The attention step: ``(B, N, H, D)`` q, k, v -> ``(B, N, H, D)`` by the inner module."""
        return self.attention(
            q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, **attention_kwargs
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        **attention_kwargs: Any,
    ) -> tuple[Tensor, None]:
        """Project, attend, normalise and project back.

        The arguments come in ``nn.MultiheadAttention.forward``'s order, so
        ``layer(x, x, x, key_padding_mask)`` works as it does there.

        Args:
            query: ``(B, N, E)``.
            key: ``(B, N, E)``; defaults to ``query`` (self-attention).
            value: ``(B, N, E)``; defaults to ``key``.
            key_padding_mask: ``(B, N)`` bool, ``True`` marks padding keys.
            need_weights: must be ``False`` (the default here, unlike
                ``nn.MultiheadAttention``): attention weights are never materialised.
            attn_mask: must be ``None``; an ``(N, N)`` mask is never built (use
                ``key_padding_mask`` or ``is_causal``).
            average_attn_weights: accepted for ``nn.MultiheadAttention``'s signature; it
                has no effect, as no weights are returned.
            is_causal: query ``p`` only sees keys ``p' <= p``.
            **attention_kwargs: passed on to the inner attention module, e.g.
                ``already_split=True`` for a ring attention.

        Returns:
            ``(out, None)`` with ``out`` of shape ``(B, N, E)``, like
            ``nn.MultiheadAttention(batch_first=True)`` with ``need_weights=False``.
        """
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: dilated attention never materialises the "
                "(N, N) attention weights; call with need_weights=False (the output is then "
                "(out, None))."
            )
        check_bool("average_attn_weights", average_attn_weights)
        if attn_mask is not None:
            raise TypeError(
                "attn_mask is not supported: dilated attention never builds an (N, N) mask. "
                "Use key_padding_mask=(B, N) bool for padding, is_causal=True for a causal "
                "mask, or a block-sparse pattern (BlockSparseAttention) for a structured one."
            )
        key = query if key is None else key
        value = key if value is None else value
        query = check_embedding_input("query", query, self.embed_dim)
        key = check_embedding_input("key", key, self.embed_dim)
        value = check_embedding_input("value", value, self.embed_dim)
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_input_dtype(name, t, self.q_proj.weight.dtype)
        B, N, _ = query.shape
        H, H_kv, D = self.num_heads, self.num_kv_heads, self.head_dim
        out = None
        if self._recomputes(query, key, value, attention_kwargs):
            out = self._projected_attention(query, is_causal, key_padding_mask, attention_kwargs)
        if out is None:
            # q: (B, N, E) -> (B, N, H, D); k, v: (B, N, E) -> (B, N, H_kv, D); views.
            q = self.q_proj(query).view(B, N, H, D)
            k = self.k_proj(key).view(key.shape[0], key.shape[1], H_kv, D)
            v = self.v_proj(value).view(value.shape[0], value.shape[1], H_kv, D)
            out = self._attend(
                q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask,
                **attention_kwargs,
            )  # fmt: skip
        out = self.norm(out.reshape(B, N, self.embed_dim))
        return self.out_proj(out), None

    def _node_attention(self, attention_kwargs: dict[str, Any]) -> tuple[nn.Module, tuple]:
        """``(inner attention, modules the node stands in for besides it)``: the inner
        module, unwrapped from :class:`RotaryAttention` when the call passes ``rotary``."""
        inner = self.attention
        if type(inner) is RotaryAttention and "rotary" in attention_kwargs:
            return inner.inner, (inner,)
        return inner, ()

    def _recomputes(
        self, query: Tensor, key: Tensor, value: Tensor, attention_kwargs: dict[str, Any]
    ) -> bool:
        """Whether this call may run as one node that recomputes q, k, v
        (``recompute_qkv``); the inner attention's ``_projected_call`` may still decline."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        inner, wrappers = self._node_attention(attention_kwargs)
        # The node reads the projections' weights and never calls the modules it stands
        # for: only plain ones without hooks (pruning, LoRA-style subclasses and hooks take
        # the separate nodes), and an inner attention whose own class defines the node
        # (a subclass that does not may compute something else in its forward).
        bypassed = (*projections, *wrappers, *inner.modules())
        return (
            self.recompute_qkv
            and "_projected_call" in type(inner).__dict__
            # rotary tables only for a RotaryAttention (any other inner rejects them)
            and ("rotary" not in attention_kwargs or bool(wrappers))
            and all(type(m) is nn.Linear for m in projections)
            and not any(_has_hooks(m) for m in bypassed)
            and not _global_module_hooks()
            and type(self)._attend is MultiheadDilatedAttention._attend
            and "_attend" not in self.__dict__  # nor an instance's own
            and key is query
            and value is query
            and torch.is_grad_enabled()
            and (
                query.requires_grad
                or any(p.requires_grad for m in projections for p in m.parameters())
            )
            and not torch.is_autocast_enabled(query.device.type)
            and (
                torch.compiler.is_compiling()
                or not torch._C._functorch.is_functorch_wrapped_tensor(query)
            )
        )

    def _projected_attention(
        self,
        x: Tensor,
        is_causal: bool,
        key_padding_mask: Tensor | None,
        attention_kwargs: dict[str, Any],
    ) -> Tensor | None:
        inner, _ = self._node_attention(attention_kwargs)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return inner._projected_call(
            x,
            tuple(p.weight for p in projections),
            tuple(p.bias for p in projections),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            **attention_kwargs,
        )

    def get_memory_estimate(
        self, seq_len: int, batch_size: int = 1, **kwargs: Any
    ) -> dict[str, Any]:
        """Per-rank bytes of one forward+backward of this layer on ``(B, N, E)`` inputs.

        The inner attention's :meth:`~DilatedAttention.get_memory_estimate` for this
        layer's heads, head dim and ``embed_dim`` (self-attention; the input, the
        parameters in their dtype, the projections, the norm, ``out_proj``, the saved
        tensors and every gradient are counted). ``kwargs``: ``dtype`` (default: the
        parameters' dtype), ``already_split``, ``with_backward``, ``is_causal``;
        ``recompute_qkv`` is this layer's. With ``num_kv_heads < num_heads`` (grouped-query attention) ``k_proj``,
        ``v_proj``, k, v and their gradients are counted with that many heads.

        Raises:
            TypeError: the inner attention has no ``get_memory_estimate``.
            ValueError: the layer was built without biases or without its norm (the
                estimate counts the default layer).
        """
        estimate = getattr(self.attention, "get_memory_estimate", None)
        if estimate is None:
            raise TypeError(
                f"the inner attention {type(self.attention).__name__} has no "
                f"get_memory_estimate; use a DilatedAttention or ring attention module."
            )
        if not self.layer_norm or self.q_proj.bias is None:
            raise ValueError(
                "get_memory_estimate counts the default layer (bias=True, layer_norm=True); "
                "this one was built with bias=False or layer_norm=False."
            )
        for name in ("num_heads", "head_dim", "embed_dim", "num_kv_heads"):
            if name in kwargs:
                raise TypeError(f"{name} is this layer's own; do not pass it.")
        kwargs.setdefault("dtype", self.q_proj.weight.dtype)
        if isinstance(self.attention, DilatedAttention):
            # Only an inner attention whose class defines the node recomputes q, k, v (see
            # _recomputes); the ring's only on shards (already_split=True).
            recomputes = (
                self.recompute_qkv
                and "_projected_call" in type(self.attention).__dict__
                and self.attention._runs_projected_node()
            )
            kwargs.setdefault("recompute_qkv", recomputes)
        else:  # another inner attention: the layer runs separate nodes
            kwargs.setdefault("recompute_qkv", False)
        return estimate(
            seq_len, batch_size, self.num_heads, self.head_dim, embed_dim=self.embed_dim,
            num_kv_heads=self.num_kv_heads, **kwargs,
        )  # fmt: skip

    def extra_repr(self) -> str:
        kv = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, "
            f"gamma_init={self.gamma_init}"
        )
