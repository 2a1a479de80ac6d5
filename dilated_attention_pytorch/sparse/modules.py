"""``nn.Module`` forms of block-sparse attention, on one device and over a ring."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import gather_replicated, shard_replicated
from ..distributed.comm import RingStats
from ..dropout import draw_seed
from ..modules import MultiheadDilatedAttention
from ..ring.standard import ProcessGroupPickling, ring_members, whole_input_error
from ..validation import (
    check_bool,
    check_choice,
    check_dropout,
    check_is_causal,
    check_positive_float,
    check_positive_int,
    check_qkv,
    check_ring_size,
    check_scale,
    is_int,
)
from .functional import (
    SPARSE_BACKENDS,
    block_sparse_attention,
    ring_kernel,
    triton_shape_unsupported,
)
from .memory import block_sparse_memory_estimate
from .ops import block_sparse_op, pattern_spec
from .patterns import PATTERN_TYPES, BlockSparsePattern, _check_ratio, make_block_sparse_pattern
from .ring import (
    RingSparseSetup,
    check_ring_sparse_call,
    ring_block_sparse_attention,
    ring_block_sparse_op,
    ring_sparse_spec,
)

__all__ = ["BlockSparseAttention", "RingBlockSparseAttention", "create_block_sparse_attention"]


class BlockSparseAttention(nn.Module):
    """Block-sparse attention on ``(B, N, H, D)`` q, k, v with a named pattern.

    The pattern (:func:`~dilated_attention_pytorch.sparse.make_block_sparse_pattern`)
    is built for each sequence length and causal setting the module sees (cached) and
    read by :meth:`pattern`; only its kept blocks are computed.

    Args:
        block_size: tokens per block.
        sparsity_ratio: fraction of (causally allowed) block pairs dropped, ``[0, 1)``.
        pattern_type: one of ``"local_window"``, ``"dilated_sparse"``, ``"global_local"``,
            ``"random"``.
        segment_lengths, dilation_rates: the ``dilated_sparse`` branch schedule in tokens
            (scaled to meet ``sparsity_ratio``); only that pattern takes them.
        num_heads: for ``"random"``: one pattern per head.
        seed: the ``"random"`` pattern's seed.
        dropout: drop probability of the attention probabilities, training only.
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"pytorch"``, ``"flex"`` or ``"triton"``, as in
            :func:`~dilated_attention_pytorch.block_sparse_attention`.
        pattern_knobs: the generator's own setting instead of a ratio, with
            ``sparsity_ratio=None``: e.g. ``{"window": 2}`` keeps 2 blocks on each side
            whatever ``N`` (linear cost); see
            :func:`~dilated_attention_pytorch.make_block_sparse_pattern`.

    Shapes:
        q, k, v: ``(B, N, H, D)``; output ``(B, N, H, D)``.
    """

    def __init__(
        self,
        block_size: int = 64,
        sparsity_ratio: float = 0.9,
        pattern_type: str = "dilated_sparse",
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        num_heads: int | None = None,
        seed: int = 0,
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str = "auto",
        pattern_knobs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.block_size = check_positive_int("block_size", block_size)
        self.sparsity_ratio = _check_ratio(sparsity_ratio)
        self.pattern_type = check_choice("pattern_type", pattern_type, PATTERN_TYPES)
        if (segment_lengths is not None or dilation_rates is not None) and (
            pattern_type != "dilated_sparse"
        ):
            raise ValueError(
                f"segment_lengths and dilation_rates shape the 'dilated_sparse' pattern only; "
                f"pattern_type={pattern_type!r} does not use them: leave them unset."
            )
        self.knobs: dict[str, Any] = {}
        if segment_lengths is not None or dilation_rates is not None:
            self.knobs = {  # numpy integers as ints: the settings travel as JSON
                name: tuple(int(x) if is_int(x) else x for x in values or ())
                for name, values in (
                    ("segment_lengths", segment_lengths),
                    ("dilation_rates", dilation_rates),
                )
            }
        if pattern_knobs is not None:
            if not isinstance(pattern_knobs, dict):
                raise TypeError(
                    f"pattern_knobs must be a dict such as {{'window': 2}}, got "
                    f"{type(pattern_knobs).__name__}."
                )
            self.knobs.update(pattern_knobs)
        self.num_heads = None if num_heads is None else check_positive_int("num_heads", num_heads)
        self.seed = seed
        self.dropout = check_dropout(dropout)
        self.scale = check_scale(scale)
        self.backend = check_choice("backend", backend, SPARSE_BACKENDS)
        self.pattern(max(self.block_size, 1) * 4, False)  # validate the settings now
        # The pattern's settings as the torch.compile operator takes them (sparse/ops.py).
        self.op_spec = pattern_spec(self.pattern_type, **self._pattern_settings())

    def _pattern_settings(self) -> dict[str, object]:
        """``make_block_sparse_pattern``'s arguments other than the length and causality."""
        knobs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.knobs.items()}
        return dict(
            block_size=self.block_size, sparsity_ratio=self.sparsity_ratio,
            num_heads=self.num_heads if self.pattern_type == "random" else None,
            seed=self.seed, **knobs,
        )  # fmt: skip

    @functools.lru_cache(maxsize=16)  # noqa: B019 (a few (N, causal) per module)
    def pattern(self, seq_len: int, is_causal: bool = False) -> BlockSparsePattern:
        """The pattern this module uses for ``seq_len`` tokens."""
        return make_block_sparse_pattern(
            self.pattern_type, seq_len, is_causal=is_causal, **self._pattern_settings()
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend ``q`` ``(B, N, H, D)`` to ``k``/``v`` over the kept blocks; the 4th
        positional argument is ``is_causal``, as in ``DilatedAttention``."""
        _no_mask(key_padding_mask)
        check_qkv(q, k, v, grouped_query=True)
        check_is_causal(is_causal)
        dropout_p = self.dropout if self.training else 0.0
        if torch.compiler.is_compiling():
            heads_error = self._heads_error(q)
            if heads_error is not None:  # the eager call's check of a per-head pattern
                raise ValueError(heads_error)
            # One opaque operator that builds the pattern itself (see sparse/ops.py): the
            # triton kernels on CUDA where they run, else the pytorch path (FlexAttention
            # is not used under torch.compile).
            backend = "auto" if self.backend == "flex" else self.backend
            return block_sparse_op(
                q, k, v, self.op_spec, is_causal=is_causal, scale=self.scale,
                dropout_p=dropout_p, kernel=ring_kernel(q, backend, self.block_size, dropout_p),
            )  # fmt: skip
        return block_sparse_attention(
            q, k, v, self.pattern(q.shape[1], is_causal), scale=self.scale,
            dropout_p=dropout_p, backend=self.backend,
        )  # fmt: skip

    def _heads_error(self, q: Tensor) -> str | None:
        """Why a per-head pattern cannot take ``q``'s heads, or ``None``."""
        # (Not `in (None, H)`: with a symbolic head count that test is always False.)
        if (
            self.pattern_type == "random"
            and self.num_heads is not None
            and (self.num_heads != q.shape[2])
        ):
            return (
                f"the pattern has one block mask per head for {self.num_heads} heads, but "
                f"q has {q.shape[2]}; build it with num_heads={q.shape[2]}."
            )
        return None

    def memory_ring_size(self) -> int:
        """Ranks per ring for :meth:`get_memory_estimate` (1: one device)."""
        return 1

    def get_memory_estimate(
        self,
        seq_len: int,
        batch_size: int = 1,
        num_heads: int = 8,
        head_dim: int = 64,
        *,
        is_causal: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Per-device bytes of one forward+backward on ``(B, N, H, D)`` inputs, counting
        only the kept blocks of this module's pattern for ``seq_len`` (no tensor is
        allocated). :func:`~dilated_attention_pytorch.sparse.block_sparse_memory_estimate`
        for :meth:`pattern` and :meth:`memory_ring_size`; ``kwargs``: ``dtype``,
        ``backend`` (default: what ``auto`` runs on CUDA: ``"triton"``, or ``"flex"``
        on one device where the Triton kernels do not take the block size or head dim;
        ``"triton"`` over a ring or for ``backend="triton"``, ``"flex"`` for
        ``backend="flex"``), ``with_backward``, ``num_kv_heads`` (grouped-query attention).
        """
        if "embed_dim" in kwargs:
            raise TypeError(
                "the block-sparse estimate counts the attention only, not a multi-head "
                "layer's projections; call layer.attention.get_memory_estimate(seq_len, "
                "batch_size, num_heads, head_dim) and add the layer's own tensors."
            )
        ring = self.memory_ring_size()
        # A ring runs our kernels; auto and pytorch are estimated as the CUDA kernels
        # auto would run.
        if ring > 1:
            default = "triton"
        elif self.backend in ("triton", "flex"):
            default = self.backend
        else:
            D = check_positive_int("head_dim", head_dim)
            default = "flex" if triton_shape_unsupported(self.block_size, D) else "triton"
        kwargs.setdefault("backend", default)
        return block_sparse_memory_estimate(
            self.pattern(check_positive_int("seq_len", seq_len), is_causal), batch_size,
            num_heads, head_dim, ring_size=ring, **kwargs,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, sparsity_ratio={self.sparsity_ratio}, "
            f"pattern_type={self.pattern_type!r}" + (f", knobs={self.knobs}" if self.knobs else "")
        )


def _no_mask(key_padding_mask: object) -> None:
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask is not supported by block-sparse attention; drop padded blocks "
            "with a custom block mask (pattern_from_block_mask) or use DilatedAttention."
        )


def _mask_error(key_padding_mask: object) -> str | None:
    """:func:`_no_mask`'s complaint as text (for the collective check), or None."""
    try:
        _no_mask(key_padding_mask)
    except ValueError as exc:
        return f"ValueError: {exc}"
    return None


class RingBlockSparseAttention(ProcessGroupPickling, BlockSparseAttention):
    """Block-sparse attention on ``(B, N, H, D)`` tensors over a sequence shared by the ranks of a ring.

    Computes exactly :class:`BlockSparseAttention`; rank ``j`` of a ring of ``k`` holds
    tokens ``[j*N/k, (j+1)*N/k)``, and a rank receives only the key/value blocks its
    queries keep (each once, by P2P) and returns only their gradients; ranks whose
    queries keep none of each other's blocks exchange nothing. k and v may have fewer
    heads than q (grouped-query attention, ``H_kv`` dividing ``H``, the same on every
    rank): only their ``H_kv`` heads travel. ``already_split``,
    ``ring_size``, ``process_group`` (shared by ``copy.deepcopy``, left out of pickles)
    and ``timeout`` are those of :class:`~dilated_attention_pytorch.StandardRingAttention`; without
    ``torch.distributed`` it is a ring of one. ``N/k`` must be a multiple of
    ``block_size``.

    Args:
        segment_lengths, dilation_rates: the ``dilated_sparse`` schedule (tokens), as in
            :class:`BlockSparseAttention`; ``None`` for the other patterns.
        sparsity_ratio, pattern_type, block_size, num_heads, seed, dropout, scale,
            pattern_knobs: as in :class:`BlockSparseAttention`.
        backend: the block kernel: ``"auto"`` (the Triton kernels on CUDA where they
            run, else ``"pytorch"``), ``"pytorch"`` or ``"triton"``. FlexAttention cannot
            take the ring's received blocks; a ring of one runs
            :class:`BlockSparseAttention` with this backend (``"auto"`` may pick flex).
        validate: ``"once"`` (default): the collective input check (two small
            ``all_gather`` of the ranks' pickled checks) runs the first time an input
            signature is seen; ``"always"``: on every call.
        timeout: seconds (a positive float) that each wait on other ranks may take (the
            input check, the exchange of K/V blocks and of their gradients, and at the
            group's first ring call the creation of the ring's own communicator);
            ``None`` (default): the process group's own timeout. A peer that died, is
            stuck or skipped the call then gives a ``RuntimeError`` on the ranks waiting
            for it that names the rank that did not answer and what was waited for.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        *,
        sparsity_ratio: float = 0.9,
        pattern_type: str = "dilated_sparse",
        block_size: int = 64,
        ring_size: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        num_heads: int | None = None,
        seed: int = 0,
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str = "auto",
        pattern_knobs: dict[str, Any] | None = None,
        validate: str = "once",
        timeout: float | None = None,
    ) -> None:
        check_choice("backend", backend, ("auto", "pytorch", "triton"))
        super().__init__(
            block_size, sparsity_ratio, pattern_type, segment_lengths=segment_lengths,
            dilation_rates=dilation_rates, num_heads=num_heads, seed=seed, dropout=dropout,
            scale=scale, backend=backend, pattern_knobs=pattern_knobs,
        )  # fmt: skip
        self.ring_size = check_ring_size(ring_size)
        self.process_group = process_group
        self.validate = check_choice("validate", validate, ("once", "always"))
        self.timeout = None if timeout is None else check_positive_float("timeout", timeout)
        self._stats: RingStats | None = None
        self._validated: set[tuple] = set()
        # For traced calls, made here so that tracing formats no float (see _agreed_now).
        self._agreed = {training: self._agreed_now(training) for training in (False, True)}
        if dist.is_available() and dist.is_initialized():
            self.ring()

    def ring(self) -> tuple[dist.ProcessGroup, tuple[int, ...]] | None:
        """``(process group, group ranks of this rank's ring)``, or ``None`` (ring of one)."""
        return ring_members(self.resolved_process_group(), self.ring_size)

    def _agreed_now(self, training: bool) -> str:
        """What the ranks of a ring must agree on: the pattern (its JSON, seed and per-head
        count included), the score scale, the dropout applied and the ring size."""
        dropout_p = self.dropout if training else 0.0
        return (
            f"{self.op_spec}, scale={self.scale!r}, dropout_p={dropout_p!r}, "
            f"ring_size={self.ring_size}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        *,
        already_split: bool = False,
    ) -> Tensor:
        """As :meth:`BlockSparseAttention.forward`; ``already_split=True`` takes and
        returns this rank's shard ``(B, N/k, H, D)``."""
        check_bool("already_split", already_split)
        ring = self.ring()
        if ring is None or len(ring[1]) == 1:
            return super().forward(
                query, key, value, is_causal=is_causal, key_padding_mask=key_padding_mask
            )
        group, members = ring
        options = {"stats": self._stats, "timeout": self.timeout}
        q, k, v = query, key, value
        error = None
        if not already_split:
            # Raised inside the collective check, so that every rank raises together.
            error = whole_input_error(query, None, len(members))
            if error is None and all(isinstance(t, Tensor) for t in (q, k, v)):
                q, k, v = (shard_replicated(t, group, members, **options) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if torch.compiler.is_compiling():
            # One opaque operator pair (sparse/ring.py) checks on every rank, builds the
            # pattern, exchanges the kept blocks and runs the kernels.
            spec = ring_sparse_spec(
                self.op_spec, group=group, members=members, block_size=self.block_size,
                is_causal=is_causal,
                kernel=ring_kernel(q, self.backend, self.block_size, dropout_p),
                stats=self._stats, validate=self.validate, config=self._agreed[self.training],
                error=error or _mask_error(key_padding_mask) or self._heads_text(q),
                owner=id(self),
            )  # fmt: skip
            out = ring_block_sparse_op(
                q, k, v, spec, scale=self.scale, dropout_p=dropout_p, timeout=self.timeout
            )
            return out if already_split else gather_replicated(out, group, members, **options)
        self._check(q, k, v, is_causal, key_padding_mask, group, members, error)
        _, L, _, D = q.shape
        N = L * len(members)
        pattern = self.pattern(N, is_causal)
        setup = RingSparseSetup(
            group=group,
            ring=members,
            position=members.index(dist.get_rank(group)),
            block_mask=pattern.block_mask,
            block_size=self.block_size,
            seq_len=N,
            scale=D**-0.5 if self.scale is None else self.scale,
            is_causal=is_causal,
            dropout_p=dropout_p,
            seed=draw_seed(dropout_p),
            stats=self._stats,
            timeout=self.timeout,
            kernel=ring_kernel(q, self.backend, self.block_size, dropout_p),
        )
        out = ring_block_sparse_attention(q, k, v, setup)
        return out if already_split else gather_replicated(out, group, members, **options)

    def _check(self, q, k, v, is_causal, mask, group, members, error=None) -> None:
        """Local checks, shared with every rank of the group so that all raise together;
        ``error``: a problem the caller already found on this rank."""
        check_ring_sparse_call(
            q, k, v, is_causal, group, members, block_size=self.block_size,
            timeout=self.timeout, config=self._agreed_now(self.training), mode=self.training,
            validated=self._validated if self.validate == "once" else None,
            error=error or _mask_error(mask) or self._heads_text(q),
        )  # fmt: skip

    def _heads_text(self, q: object) -> str | None:
        """:meth:`_heads_error` as the collective check's text (q not a tensor: its own
        check says so)."""
        error = self._heads_error(q) if isinstance(q, Tensor) and q.dim() == 4 else None
        return None if error is None else f"ValueError: {error}"

    def memory_ring_size(self) -> int:
        """``ring_size``, else the process group's size (1 without ``torch.distributed``)."""
        if self.ring_size is not None:
            return self.ring_size
        ring = self.ring()
        return 1 if ring is None else len(ring[1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ring_size={self.ring_size}"


def create_block_sparse_attention(
    embed_dim: int = 768,
    num_heads: int = 12,
    sparsity_ratio: float = 0.9,
    pattern_type: str = "dilated_sparse",
    block_size: int = 64,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    **kwargs: Any,
) -> MultiheadDilatedAttention:
    """A multi-head layer ``(B, N, E) -> (B, N, E)`` whose attention is block-sparse.

    :class:`~dilated_attention_pytorch.MultiheadDilatedAttention` (projections, norm,
    ``out_proj``) with a :class:`BlockSparseAttention` inside. ``kwargs``: the
    attention's ``seed``, ``dropout``, ``scale``, ``num_heads_pattern`` (per-head random
    patterns) and the layer's ``bias``, ``layer_norm``, ``gamma_init``, ``device``,
    ``dtype``, ``num_kv_heads`` (grouped-query attention: ``k_proj``/``v_proj`` give that
    many heads, which the block-sparse attention reads in place).
    """
    attention_keys = {"seed", "dropout", "scale"}
    attention_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in attention_keys}
    per_head = kwargs.pop("num_heads_pattern", False)
    layer_keys = {"bias", "layer_norm", "gamma_init", "device", "dtype", "num_kv_heads"}
    unknown = set(kwargs) - layer_keys
    if unknown:
        raise TypeError(
            f"create_block_sparse_attention got unknown keyword(s) {sorted(unknown)}; it takes "
            f"{sorted(attention_keys | layer_keys | {'num_heads_pattern'})}."
        )
    attention = BlockSparseAttention(
        block_size, sparsity_ratio, pattern_type, segment_lengths=segment_lengths,
        dilation_rates=dilation_rates, num_heads=num_heads if per_head else None,
        **attention_kwargs,
    )  # fmt: skip
    return MultiheadDilatedAttention(embed_dim, num_heads, attention=attention, **kwargs)
