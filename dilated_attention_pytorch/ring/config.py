"""``RingAttentionConfig``: one validated, immutable set of ring settings, and presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..backends import available_backends
from ..validation import (
    check_backend_name,
    check_bool,
    check_branch_mixing,
    check_choice,
    check_dropout,
    check_optional_positive_int,
    check_positive_float,
    check_ring_size,
    validate_branches,
)

__all__ = ["RING_PRESETS", "RingAttentionConfig"]


@dataclass(frozen=True, kw_only=True)
class RingAttentionConfig:
    """Settings of the ring family, validated on construction.

    Every field changes what the built module does:

    - ``segment_lengths``, ``dilation_rates``, ``branch_mixing``, ``dropout``,
      ``backend``: the dilated attention (as in ``DilatedAttention``).
    - ``ring_size``: ranks per ring (``None``: the whole process group).
    - ``use_hilbert``, ``hilbert_curve_level``: tokens in Hilbert-curve order
      (:class:`~dilated_attention_pytorch.ring.HilbertRingAttention`; the level fixes a
      ``2**level`` square grid).
    - ``enable_monitoring``, ``use_checkpointing``: the operations features of
      :class:`~dilated_attention_pytorch.ring.DistributedRingAttention`.
    - ``timeout``: seconds any wait on another rank may take before an error.
    - ``validate``: the collective input check ``"once"`` per input signature or
      ``"always"``.

    ``to_dict()`` / ``from_dict()`` round-trip exactly.
    """

    segment_lengths: tuple[int, ...] = (2048, 4096, 8192)
    dilation_rates: tuple[int, ...] = (1, 2, 4)
    dropout: float = 0.0
    ring_size: int | None = None
    branch_mixing: str = "softmax"
    use_hilbert: bool = False
    hilbert_curve_level: int | None = None
    enable_monitoring: bool = False
    use_checkpointing: bool = False
    timeout: float | None = None
    validate: str = "once"
    backend: str = "auto"

    def __post_init__(self) -> None:
        ws, rs = validate_branches(self.segment_lengths, self.dilation_rates)
        object.__setattr__(self, "segment_lengths", ws)
        object.__setattr__(self, "dilation_rates", rs)
        object.__setattr__(self, "dropout", check_dropout(self.dropout))
        check_ring_size(self.ring_size)
        check_branch_mixing(self.branch_mixing)
        check_bool("use_hilbert", self.use_hilbert)
        check_optional_positive_int("hilbert_curve_level", self.hilbert_curve_level)
        if self.hilbert_curve_level is not None and not self.use_hilbert:
            raise ValueError(
                f"hilbert_curve_level={self.hilbert_curve_level} only applies to Hilbert order; "
                f"set use_hilbert=True or leave hilbert_curve_level=None."
            )
        check_bool("enable_monitoring", self.enable_monitoring)
        check_bool("use_checkpointing", self.use_checkpointing)
        if self.timeout is not None:
            object.__setattr__(self, "timeout", check_positive_float("timeout", self.timeout))
        check_choice("validate", self.validate, ("once", "always"))
        check_backend_name(self.backend, available_backends())

    def replace(self, **changes: Any) -> RingAttentionConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists for the branch lists), e.g. for JSON."""
        data = dataclasses.asdict(self)
        data["segment_lengths"] = list(self.segment_lengths)
        data["dilation_rates"] = list(self.dilation_rates)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RingAttentionConfig:
        """The config of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"from_dict needs a dict, got {type(data).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise TypeError(
                f"unknown RingAttentionConfig field(s) {unknown}; valid fields are {sorted(fields)}."
            )
        return cls(**data)


# Named settings for create_ring_attention_from_preset.
RING_PRESETS: dict[str, RingAttentionConfig] = {
    # Debugging: monitoring on, the collective input check on every call.
    "development": RingAttentionConfig(
        segment_lengths=(2048, 4096),
        dilation_rates=(1, 2),
        enable_monitoring=True,
        validate="always",
    ),
    # Training runs: the input check once per input signature, nothing else.
    "production": RingAttentionConfig(
        segment_lengths=(2048, 4096, 8192), dilation_rates=(1, 2, 4), validate="once"
    ),
    # Long sequences: activation checkpointing of the ring.
    "large_scale": RingAttentionConfig(
        segment_lengths=(4096, 8192, 16384, 32768),
        dilation_rates=(1, 2, 4, 8),
        use_checkpointing=True,
    ),
    # Image patches: Hilbert-curve order.
    "hilbert_optimized": RingAttentionConfig(
        segment_lengths=(2048, 4096, 8192), dilation_rates=(1, 2, 4), use_hilbert=True
    ),
}
