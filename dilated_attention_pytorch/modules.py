"""Thin ``nn.Module`` wrappers over :func:`~dilated_attention_pytorch.dilated_attention`.

They own hyper-parameters and projections; the maths lives in :mod:`.functional`
(DESIGN.md section 2.5). Both modules are batch-first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .backends import get_backend
from .functional import dilated_attention
from .plan import check_branch_mixing, validate_branches
from .validation import check_probability, check_scalars

__all__ = ["DilatedAttention", "MultiheadDilatedAttention"]


def check_backend_name(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__} {backend!r}.")
    if backend != "auto":
        get_backend(backend)  # raises a ValueError listing the valid names
    return backend


def check_dropout(dropout: object) -> float:
    """``dropout`` must be a float in ``[0, 1)``; returns it as a float."""
    return check_probability("dropout", dropout)


def check_head_split(embed_dim: object, num_heads: object) -> int:
    """``embed_dim`` and ``num_heads`` positive ints, ``embed_dim % num_heads == 0``; returns head_dim."""
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
        if value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}.")
    assert isinstance(embed_dim, int) and isinstance(num_heads, int)
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and "
            f"num_heads={num_heads} (head_dim would be {embed_dim / num_heads:g}); choose "
            f"num_heads among the divisors of embed_dim."
        )
    return embed_dim // num_heads


def check_gamma_init(gamma_init: object) -> float:
    if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
        raise TypeError(
            f"gamma_init must be a float, got {type(gamma_init).__name__} {gamma_init!r}."
        )
    if not math.isfinite(gamma_init) or gamma_init <= 0:
        raise ValueError(f"gamma_init must be a positive finite float, got {gamma_init}.")
    return float(gamma_init)


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
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"`` or a registered backend name.

    Shapes:
        q, k, v: ``(B, N, H, D)``; output ``(B, N, H, D)``.
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
        check_scalars(scale=scale, dropout_p=0.0, is_causal=False)
        self.scale = None if scale is None else float(scale)
        self.backend = check_backend_name(backend)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend ``q`` to ``k``/``v``.

        Args:
            q, k, v: ``(B, N, H, D)``, one dtype and device.
            is_causal: query ``p`` only sees keys ``p' <= p``.
            key_padding_mask: ``(B, N)`` bool, ``True`` marks padding keys.

        Returns:
            ``(B, N, H, D)`` in ``q.dtype``.
        """
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
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, "
            f"dilation_rates={list(self.dilation_rates)}, branch_mixing={self.branch_mixing!r}, "
            f"dropout={self.dropout}, scale={self.scale}, backend={self.backend!r}"
        )


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention with projections, batch-first.

    ``out = out_proj(norm(attend(q_proj(query), k_proj(key), v_proj(value))))`` where
    ``attend`` is :class:`DilatedAttention` on ``num_heads`` heads of size
    ``embed_dim // num_heads`` and ``norm`` is the LongNet/MAGNETO sub-LayerNorm
    (identity when ``layer_norm=False``).

    Initialisation follows MAGNETO (arXiv 2210.06423): xavier-normal weights and zero
    biases, with the ``v_proj`` and ``out_proj`` weights' gain set to ``gamma_init``
    (pass the depth-dependent value of your model; ``1.0`` is plain xavier).

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: number of heads ``H``. In ``"softmax"`` mode ``H`` smaller than the
            largest dilation rate is allowed, but offsets ``>= H`` then go unused.
        segment_lengths, dilation_rates, branch_mixing, dropout: see :class:`DilatedAttention`.
        bias: add biases to the four projections.
        layer_norm: apply the sub-LayerNorm before ``out_proj``.
        gamma_init: MAGNETO gain of the ``v_proj`` and ``out_proj`` weights.
        scale: score scale, default ``(E // H) ** -0.5``.
        backend: ``"auto"`` or a registered backend name.
        device, dtype: of the parameters.

    Subclasses that change *how* attention is computed (e.g. a sequence-parallel ring)
    override :meth:`_attend` only; projections, norm and checks stay here.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        dropout: float = 0.0,
        bias: bool = True,
        branch_mixing: str = "softmax",
        layer_norm: bool = True,
        gamma_init: float = 1.0,
        scale: float | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = check_head_split(embed_dim, num_heads)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.gamma_init = check_gamma_init(gamma_init)
        self.attention = DilatedAttention(
            segment_lengths,
            dilation_rates,
            branch_mixing=branch_mixing,
            dropout=dropout,
            scale=scale,
            backend=backend,
        )
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
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

    def _check_input(self, name: str, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape (B, N, E), got {type(x).__name__}."
            )
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{name} must have shape (B, N, E) with E = embed_dim = {self.embed_dim} "
                f"(batch-first), got {tuple(x.shape)}; if your tensor is (N, B, E), pass "
                f"{name}.transpose(0, 1)."
            )
        return x

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        is_causal: bool,
        key_padding_mask: Tensor | None,
    ) -> Tensor:
        """The attention step: ``(B, N, H, D)`` q, k, v -> ``(B, N, H, D)``.

        The one method a subclass overrides to compute attention differently.
        """
        return self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, None]:
        """Project, attend, normalise and project back.

        Args:
            query: ``(B, N, E)``.
            key: ``(B, N, E)``; defaults to ``query`` (self-attention).
            value: ``(B, N, E)``; defaults to ``key``.
            key_padding_mask: ``(B, N)`` bool, ``True`` marks padding keys.
            is_causal: query ``p`` only sees keys ``p' <= p``.
            need_weights: must be ``False``: attention weights are never materialised.

        Returns:
            ``(out, None)`` with ``out`` of shape ``(B, N, E)``, like
            ``nn.MultiheadAttention(batch_first=True)``.
        """
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: dilated attention never materialises the "
                "(N, N) attention weights; call with need_weights=False (the output is then "
                "(out, None))."
            )
        key = query if key is None else key
        value = key if value is None else value
        query = self._check_input("query", query)
        key = self._check_input("key", key)
        value = self._check_input("value", value)
        B, N, _ = query.shape
        H, D = self.num_heads, self.head_dim
        # q, k, v: (B, N, E) -> (B, N, H, D), views of the projections.
        q = self.q_proj(query).view(B, N, H, D)
        k = self.k_proj(key).view(key.shape[0], key.shape[1], H, D)
        v = self.v_proj(value).view(value.shape[0], value.shape[1], H, D)
        out = self._attend(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)
        out = self.norm(out.reshape(B, N, self.embed_dim))
        return self.out_proj(out), None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, gamma_init={self.gamma_init}"
        )
