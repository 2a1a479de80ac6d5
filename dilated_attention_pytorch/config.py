"""``DilatedAttentionConfig``: one validated, immutable set of hyper-parameters.

The config is checked on construction with the same checks the modules run, so a
bad schedule fails where it is written, not at the first forward. It turns into
module keywords with :meth:`DilatedAttentionConfig.attention_kwargs` and
:meth:`DilatedAttentionConfig.multihead_kwargs`, which the factory uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .backends import available_backends
from .validation import (
    check_backend_name,
    check_bool,
    check_branch_mixing,
    check_dropout,
    check_gamma_init,
    check_head_split,
    check_num_kv_heads,
    check_positive_int,
    check_scale,
    validate_branches,
)

__all__ = ["PRESETS", "DilatedAttentionConfig"]

# Named branch schedules (segment_lengths, dilation_rates).
PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # The schedule of the LongNet paper's language-modelling runs (arXiv 2307.02486,
    # section 4.1): five branches up to 32K tokens.
    "longnet_32k": ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)),
    # A small geometric schedule for tests, demos and CPU runs.
    "tiny": ((64, 128, 256), (1, 2, 4)),
}


@dataclass(frozen=True, kw_only=True)
class DilatedAttentionConfig:
    """Hyper-parameters of :class:`~dilated_attention_pytorch.DilatedAttention` and,
    when ``embed_dim`` and ``num_heads`` are set, of
    :class:`~dilated_attention_pytorch.MultiheadDilatedAttention` (``num_kv_heads``: its
    K/V heads for grouped-query attention, default ``num_heads``).

    Keyword-only and frozen; validated on construction (``ValueError``/``TypeError``
    with what was expected and what arrived). Lists are stored as tuples.

    Example:
        >>> cfg = DilatedAttentionConfig(segment_lengths=[256, 512], dilation_rates=[1, 2])
        >>> cfg.segment_lengths
        (256, 512)
        >>> DilatedAttentionConfig.from_preset("tiny", embed_dim=64, num_heads=4).num_heads
        4
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    branch_mixing: str = "softmax"
    dropout: float = 0.0
    scale: float | None = None
    backend: str = "auto"
    # Multi-head fields: both of embed_dim/num_heads, or neither.
    embed_dim: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None  # grouped-query attention (needs num_heads)
    bias: bool = True
    layer_norm: bool = True
    gamma_init: float = 1.0

    def __post_init__(self) -> None:
        ws, rs = validate_branches(self.segment_lengths, self.dilation_rates)
        object.__setattr__(self, "segment_lengths", ws)
        object.__setattr__(self, "dilation_rates", rs)
        check_branch_mixing(self.branch_mixing)
        object.__setattr__(self, "dropout", check_dropout(self.dropout))
        object.__setattr__(self, "scale", check_scale(self.scale))
        check_backend_name(self.backend, available_backends())
        if (self.embed_dim is None) != (self.num_heads is None):
            raise ValueError(
                f"embed_dim and num_heads must be given together (for a multi-head layer) or "
                f"both left None, got embed_dim={self.embed_dim!r} and num_heads={self.num_heads!r}."
            )
        if self.embed_dim is not None:
            check_head_split(self.embed_dim, self.num_heads)
        if self.num_kv_heads is not None:
            if self.num_heads is None:
                raise ValueError(
                    f"num_kv_heads={self.num_kv_heads!r} is the K/V head count of a multi-head "
                    f"layer; set embed_dim and num_heads too."
                )
            check_num_kv_heads(self.num_kv_heads, self.num_heads)
        check_bool("bias", self.bias)
        check_bool("layer_norm", self.layer_norm)
        object.__setattr__(self, "gamma_init", check_gamma_init(self.gamma_init))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DilatedAttentionConfig:
        """A config with the branch schedule of ``PRESETS[name]``; ``overrides`` set other fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets are {sorted(PRESETS)}.")
        segment_lengths, dilation_rates = PRESETS[name]
        return cls(segment_lengths=segment_lengths, dilation_rates=dilation_rates, **overrides)

    @classmethod
    def geometric(
        cls,
        *,
        base_segment_length: int,
        num_branches: int,
        ratio: int = 2,
        **overrides: Any,
    ) -> DilatedAttentionConfig:
        """LongNet's geometric schedule: ``w_i = base * ratio**i`` and ``r_i = ratio**i``.

        Every branch then attends over ``w_i / r_i = base_segment_length`` tokens per
        head and segment, so cost grows linearly with ``N``.
        """
        check_positive_int("base_segment_length", base_segment_length)
        check_positive_int("num_branches", num_branches)
        check_positive_int("ratio", ratio)
        return cls(
            segment_lengths=[base_segment_length * ratio**i for i in range(num_branches)],
            dilation_rates=[ratio**i for i in range(num_branches)],
            **overrides,
        )

    def replace(self, **changes: Any) -> DilatedAttentionConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def attention_kwargs(self) -> dict[str, Any]:
        """Keywords of :class:`~dilated_attention_pytorch.DilatedAttention`."""
        return {
            "segment_lengths": self.segment_lengths,
            "dilation_rates": self.dilation_rates,
            "branch_mixing": self.branch_mixing,
            "dropout": self.dropout,
            "scale": self.scale,
            "backend": self.backend,
        }

    def multihead_kwargs(self) -> dict[str, Any]:
        """Keywords of :class:`~dilated_attention_pytorch.MultiheadDilatedAttention`."""
        if self.embed_dim is None:
            raise ValueError(
                "this config has no embed_dim/num_heads, so it cannot build a multi-head layer; "
                "set them, e.g. config.replace(embed_dim=512, num_heads=8)."
            )
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            **self.attention_kwargs(),
            "bias": self.bias,
            "layer_norm": self.layer_norm,
            "gamma_init": self.gamma_init,
            # Only when set: layers built from these keywords need not take it otherwise.
            **({} if self.num_kv_heads is None else {"num_kv_heads": self.num_kv_heads}),
        }
