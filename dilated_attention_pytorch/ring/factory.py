"""``create_ring_attention``: build a ring-family module by implementation name, loudly."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..sparse.modules import RingBlockSparseAttention
from .config import RING_PRESETS, RingAttentionConfig
from .distributed import DistributedRingAttention
from .hilbert import HilbertRingAttention
from .standard import StandardRingAttention

__all__ = ["RING_IMPLEMENTATIONS", "create_ring_attention", "create_ring_attention_from_preset"]

logger = logging.getLogger("dilated_attention_pytorch")

RING_IMPLEMENTATIONS = ("standard", "hilbert", "distributed", "block_sparse")
# Keywords that are not config fields: where the module runs, and the Hilbert grid.
_EXTRA_KEYWORDS = (
    "process_group", "grid_size", "world_size", "sparsity_ratio", "pattern_type", "block_size",
)  # fmt: skip
_SPARSE_KEYWORDS = ("sparsity_ratio", "pattern_type", "block_size")
_DISTRIBUTED_FIELDS = ("enable_monitoring", "use_checkpointing")


def _distributed_features(config: RingAttentionConfig) -> list[str]:
    """The operations features of the 'distributed' implementation that ``config`` asks for."""
    return [f for f in _DISTRIBUTED_FIELDS if getattr(config, f)]


def _choose(config: RingAttentionConfig, extras: dict[str, Any]) -> tuple[str, str]:
    """``(implementation, why)`` for ``implementation="auto"``."""
    if extras.get("sparsity_ratio") is not None:
        return "block_sparse", "sparsity_ratio was given"
    if config.use_hilbert:
        return "hilbert", "config.use_hilbert is set"
    asked = _distributed_features(config)
    if asked:
        return "distributed", f"{' and '.join(asked)} asked for"
    return "standard", "no Hilbert order, sparsity or operations feature asked for"


def create_ring_attention(
    implementation: str = "auto", config: RingAttentionConfig | None = None, **kwargs: Any
) -> nn.Module:
    """Build a ring-family attention module over ``(B, N, H, D)`` q, k, v.

    Args:
        implementation: ``"standard"`` (:class:`StandardRingAttention`), ``"hilbert"``
            (:class:`HilbertRingAttention`), ``"distributed"``
            (:class:`DistributedRingAttention`), ``"block_sparse"``
            (:class:`~dilated_attention_pytorch.sparse.RingBlockSparseAttention`) or
            ``"auto"``: block_sparse when ``sparsity_ratio`` is given,
            hilbert when ``config.use_hilbert``, distributed when monitoring or
            checkpointing is asked for, else standard; the choice is logged at INFO.
        config: the settings; ``None`` means ``RingAttentionConfig()`` (LongNet's
            ``[2048, 4096, 8192]`` / ``[1, 2, 4]``).
        **kwargs: config fields overriding ``config``, plus ``process_group``,
            ``grid_size`` (Hilbert), ``world_size`` (another name of ``ring_size``) and
            ``sparsity_ratio``, ``pattern_type``, ``block_size`` (block_sparse; the
            config's segment lengths and dilation rates shape its ``dilated_sparse``
            pattern).

    Raises:
        ValueError: unknown implementation (the valid ones are listed), or settings the
            chosen implementation does not have (e.g. monitoring on ``"standard"``).
        TypeError: unknown keyword (the accepted ones are listed).
    """
    if not isinstance(implementation, str):
        raise TypeError(
            f"implementation must be a str, got {type(implementation).__name__} {implementation!r}."
        )
    if implementation != "auto" and implementation not in RING_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown ring implementation {implementation!r}; valid ones are "
            f"{['auto', *RING_IMPLEMENTATIONS]}."
        )
    if config is None:
        config = RingAttentionConfig()
    elif not isinstance(config, RingAttentionConfig):
        raise TypeError(f"config must be a RingAttentionConfig, got {type(config).__name__}.")
    fields = [f.name for f in config.__dataclass_fields__.values()]
    unknown = sorted(set(kwargs) - set(fields) - set(_EXTRA_KEYWORDS))
    if unknown:
        raise TypeError(
            f"create_ring_attention got unexpected keyword argument(s) {unknown}; accepted "
            f"keywords are {fields + list(_EXTRA_KEYWORDS)}."
        )
    extras = {k: kwargs.pop(k) for k in _EXTRA_KEYWORDS if k in kwargs}
    if "world_size" in extras:
        world_size = extras.pop("world_size")
        if "ring_size" in kwargs and kwargs["ring_size"] != world_size:
            raise ValueError(
                f"world_size={world_size} and ring_size={kwargs['ring_size']} disagree; "
                f"world_size is another name of ring_size: pass one of them."
            )
        kwargs["ring_size"] = world_size
    config = config.replace(**kwargs) if kwargs else config
    if implementation == "auto":
        implementation, why = _choose(config, extras)
        logger.info("create_ring_attention('auto') chose %r: %s", implementation, why)
    sparse_given = [k for k in _SPARSE_KEYWORDS if k in extras]
    if sparse_given and implementation != "block_sparse":
        raise ValueError(f"{sparse_given} only apply to the 'block_sparse' implementation.")
    if implementation == "block_sparse":
        return _block_sparse(config, extras)
    if implementation != "distributed":
        asked = _distributed_features(config)
        if asked:
            raise ValueError(
                f"{asked} are features of the 'distributed' implementation, not of "
                f"{implementation!r}; use implementation='distributed' (or 'auto')."
            )
    if config.use_hilbert != (implementation == "hilbert"):
        raise ValueError(
            f"use_hilbert={config.use_hilbert} does not fit implementation={implementation!r}: "
            f"Hilbert order is the 'hilbert' implementation."
        )
    if "grid_size" in extras and implementation != "hilbert":
        raise ValueError("grid_size only applies to the 'hilbert' implementation.")
    common: dict[str, Any] = dict(
        dropout=config.dropout,
        ring_size=config.ring_size,
        branch_mixing=config.branch_mixing,
        backend=config.backend,
        validate=config.validate,
        timeout=config.timeout,
        process_group=extras.get("process_group"),
    )
    schedule = (config.segment_lengths, config.dilation_rates)
    if implementation == "hilbert":
        return HilbertRingAttention(
            *schedule,
            grid_size=extras.get("grid_size"),
            hilbert_level=config.hilbert_curve_level,
            **common,
        )
    if implementation == "distributed":
        return DistributedRingAttention(
            *schedule,
            enable_monitoring=config.enable_monitoring,
            use_checkpointing=config.use_checkpointing,
            **common,
        )
    return StandardRingAttention(*schedule, **common)


def _block_sparse(config: RingAttentionConfig, extras: dict[str, Any]) -> nn.Module:
    """The 'block_sparse' implementation; config fields it cannot honour raise."""
    unsupported = {
        "branch_mixing": config.branch_mixing != "softmax",
        "backend": config.backend != "auto",
        "use_hilbert": config.use_hilbert,
        "enable_monitoring": config.enable_monitoring,
        "use_checkpointing": config.use_checkpointing,
    }
    asked = [name for name, set_ in unsupported.items() if set_]
    if asked:
        raise ValueError(
            f"{asked} are not features of the 'block_sparse' implementation; leave them at "
            f"their defaults (it has its own block kernel and no Hilbert order)."
        )
    pattern_type = extras.get("pattern_type", "dilated_sparse")
    schedule: dict[str, Any] = {}
    if pattern_type == "dilated_sparse":
        schedule = dict(
            segment_lengths=config.segment_lengths, dilation_rates=config.dilation_rates
        )
    return RingBlockSparseAttention(
        **schedule,
        sparsity_ratio=extras.get("sparsity_ratio", 0.9),
        pattern_type=pattern_type,
        block_size=extras.get("block_size", 64),
        dropout=config.dropout,
        ring_size=config.ring_size,
        validate=config.validate,
        timeout=config.timeout,
        process_group=extras.get("process_group"),
    )


def create_ring_attention_from_preset(
    preset: str, implementation: str = "auto", **overrides: Any
) -> nn.Module:
    """:func:`create_ring_attention` with the settings of ``RING_PRESETS[preset]``.

    Presets: ``"development"`` ([2048, 4096] / [1, 2], monitoring on, the collective
    input check on every call), ``"production"`` ([2048, 4096, 8192] / [1, 2, 4], the
    check once per input signature), ``"large_scale"`` ([4096 .. 32768] / [1, 2, 4, 8],
    activation checkpointing), ``"hilbert_optimized"`` ([2048, 4096, 8192] / [1, 2, 4],
    Hilbert order). ``overrides`` change fields or pass the extra keywords.
    """
    if preset not in RING_PRESETS:
        raise ValueError(
            f"unknown ring preset {preset!r}; valid presets are {sorted(RING_PRESETS)}."
        )
    return create_ring_attention(implementation, RING_PRESETS[preset], **overrides)
