"""Deprecated names, kept so that code written for earlier APIs keeps running.

Every name here is its replacement under another name: it computes exactly what the
replacement computes and emits a :class:`DeprecationWarning` naming the replacement
when it is imported or accessed from the package, and again when it is constructed.

| deprecated | use instead |
| --- | --- |
| ``RingDilatedAttentionV2``, ``RingDilatedAttentionV2Collective``, ``RingDilatedAttentionProduction`` | :class:`~dilated_attention_pytorch.ring.StandardRingAttention` |
| ``RingDilatedAttentionCorrect``, ``RingDilatedAttentionSDPA`` | :class:`~dilated_attention_pytorch.ring.RingMultiheadDilatedAttention` |
| ``RingDilatedAttentionHilbertGPUOptimized`` | :class:`~dilated_attention_pytorch.ring.HilbertRingMultiheadAttention` |
| ``RingDistributedDilatedAttention`` | :class:`~dilated_attention_pytorch.ring.EnterpriseDistributedDilatedAttention` |
| ``BlockSparseRingDilatedAttention`` | :class:`~dilated_attention_pytorch.ring.RingBlockSparseAttention` |
| module ``dilated_attention_pytorch.ring_dilated_attention_v2`` | ``dilated_attention_pytorch.ring`` |
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .ring import (
    EnterpriseDistributedDilatedAttention,
    HilbertRingMultiheadAttention,
    RingBlockSparseAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
)

__all__ = ["DEPRECATED", "deprecated_attribute"]


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} is deprecated; use {new} instead (the same computation).",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def _ring_alias(old: str) -> type[StandardRingAttention]:
    class Alias(StandardRingAttention):
        def __init__(
            self,
            segment_lengths: Sequence[int],
            dilation_rates: Sequence[int],
            *,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
            **kwargs: Any,
        ) -> None:
            # device/dtype: accepted as the earlier API did; the ring attention has no
            # parameters or buffers, so there is nothing to place.
            _warn(old, "dilated_attention_pytorch.ring.StandardRingAttention")
            super().__init__(segment_lengths, dilation_rates, **kwargs)

    Alias.__name__ = Alias.__qualname__ = old
    Alias.__doc__ = f"Deprecated: :class:`StandardRingAttention` under the name ``{old}``."
    return Alias


def _multihead_alias(old: str) -> type[RingMultiheadDilatedAttention]:
    class Alias(RingMultiheadDilatedAttention):
        def __init__(
            self,
            segment_lengths: Sequence[int],
            dilation_rates: Sequence[int],
            embed_dim: int = 768,
            num_heads: int = 12,
            **kwargs: Any,
        ) -> None:
            # 768 / 12: the defaults of the earlier API, which built these without them.
            _warn(old, "dilated_attention_pytorch.ring.RingMultiheadDilatedAttention")
            super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)

    Alias.__name__ = Alias.__qualname__ = old
    Alias.__doc__ = (
        f"Deprecated: :class:`RingMultiheadDilatedAttention` under the name ``{old}`` "
        f"(segment lengths first; ``embed_dim=768``, ``num_heads=12`` by default)."
    )
    return Alias


RingDilatedAttentionV2 = _ring_alias("RingDilatedAttentionV2")
RingDilatedAttentionV2Collective = _ring_alias("RingDilatedAttentionV2Collective")
RingDilatedAttentionProduction = _ring_alias("RingDilatedAttentionProduction")
RingDilatedAttentionCorrect = _multihead_alias("RingDilatedAttentionCorrect")


class RingDilatedAttentionHilbertGPUOptimized(HilbertRingMultiheadAttention):
    """Deprecated: :class:`HilbertRingMultiheadAttention` under its earlier name
    (segment lengths first; ``embed_dim=768``, ``num_heads=12`` by default)."""

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        embed_dim: int = 768,
        num_heads: int = 12,
        *,
        use_hilbert: bool = True,
        **kwargs: Any,
    ) -> None:
        _warn(
            "RingDilatedAttentionHilbertGPUOptimized",
            "dilated_attention_pytorch.ring.HilbertRingMultiheadAttention",
        )
        if use_hilbert is not True:
            raise ValueError(
                "RingDilatedAttentionHilbertGPUOptimized(use_hilbert=False) is the plain ring: "
                "use RingMultiheadDilatedAttention instead."
            )
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)


class RingDistributedDilatedAttention(EnterpriseDistributedDilatedAttention):
    """Deprecated: :class:`EnterpriseDistributedDilatedAttention` under its earlier name."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        **kwargs: Any,
    ) -> None:
        _warn(
            "RingDistributedDilatedAttention",
            "dilated_attention_pytorch.ring.EnterpriseDistributedDilatedAttention",
        )
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)


RingDilatedAttentionSDPA = _multihead_alias("RingDilatedAttentionSDPA")


class BlockSparseRingDilatedAttention(RingBlockSparseAttention):
    """Deprecated: :class:`RingBlockSparseAttention` under its earlier name, configured by
    ``sparsity_config={"sparsity_ratio": .., "pattern_type": .., "block_size": ..}``.

    ``segment_lengths`` and ``dilation_rates`` shape the ``"dilated_sparse"`` pattern (the
    default); with another ``pattern_type`` they have no meaning, and are ignored with a
    ``UserWarning``."""

    _CONFIG_KEYS = ("sparsity_ratio", "pattern_type", "block_size")

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        sparsity_config: dict[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        _warn(
            "BlockSparseRingDilatedAttention",
            "dilated_attention_pytorch.ring.RingBlockSparseAttention",
        )
        config = dict(sparsity_config or {})
        unknown = sorted(set(config) - set(self._CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"sparsity_config keys {unknown} are not supported; it takes "
                f"{list(self._CONFIG_KEYS)}."
            )
        pattern_type = config.get("pattern_type", kwargs.get("pattern_type", "dilated_sparse"))
        if pattern_type != "dilated_sparse" and (segment_lengths, dilation_rates) != (None, None):
            warnings.warn(
                f"BlockSparseRingDilatedAttention: segment_lengths and dilation_rates shape the "
                f"'dilated_sparse' pattern only; ignored for pattern_type={pattern_type!r}.",
                UserWarning,
                stacklevel=2,
            )
            segment_lengths = dilation_rates = None
        # device/dtype: accepted as the earlier API did; there are no parameters to place.
        super().__init__(segment_lengths, dilation_rates, **config, **kwargs)


# name -> (object, replacement named in the warning)
DEPRECATED: dict[str, tuple[Any, str]] = {
    "RingDilatedAttentionV2": (RingDilatedAttentionV2, "StandardRingAttention"),
    "RingDilatedAttentionV2Collective": (
        RingDilatedAttentionV2Collective,
        "StandardRingAttention",
    ),
    "RingDilatedAttentionProduction": (RingDilatedAttentionProduction, "StandardRingAttention"),
    "RingDilatedAttentionCorrect": (RingDilatedAttentionCorrect, "RingMultiheadDilatedAttention"),
    "RingDilatedAttentionSDPA": (RingDilatedAttentionSDPA, "RingMultiheadDilatedAttention"),
    "RingDilatedAttentionHilbertGPUOptimized": (
        RingDilatedAttentionHilbertGPUOptimized,
        "HilbertRingMultiheadAttention",
    ),
    "RingDistributedDilatedAttention": (
        RingDistributedDilatedAttention,
        "EnterpriseDistributedDilatedAttention",
    ),
    "BlockSparseRingDilatedAttention": (
        BlockSparseRingDilatedAttention,
        "RingBlockSparseAttention",
    ),
}


def deprecated_attribute(module: str, name: str) -> Any:
    """The deprecated ``name`` accessed on ``module`` (warns), or ``AttributeError``."""
    if name not in DEPRECATED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    obj, new = DEPRECATED[name]
    _warn(f"{module}.{name}", f"dilated_attention_pytorch.ring.{new}", stacklevel=4)
    return obj


class _DeprecatedModule(types.ModuleType):
    """``dilated_attention_pytorch.ring_dilated_attention_v2``: every attribute warns."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "RingDilatedAttention":
            _warn(f"{self.__name__}.{name}", "dilated_attention_pytorch.ring.StandardRingAttention")
            return StandardRingAttention
        return deprecated_attribute(self.__name__, name)


_V2_MODULE = "dilated_attention_pytorch.ring_dilated_attention_v2"
sys.modules.setdefault(
    _V2_MODULE,
    _DeprecatedModule(_V2_MODULE, "Deprecated module: use dilated_attention_pytorch.ring."),
)
