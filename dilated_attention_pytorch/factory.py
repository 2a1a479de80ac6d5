"""Build attention modules by kind name, failing loudly.

A *kind* is a registered ``nn.Module`` class: either a plain attention over
``(B, N, H, D)`` tensors (built by :func:`create_dilated_attention`) or a
multi-head layer over ``(B, N, E)`` inputs (built by
:func:`create_multihead_dilated_attention`). The library's kinds are registered at
the bottom of this file, the one table of kinds; users add their own with
:func:`register_attention_kind`.

- Unknown kind: ``ValueError`` listing the valid ones.
- Unknown or missing keyword: ``TypeError`` naming it and the accepted ones.
- ``kind="auto"``: the available kind with the highest ``auto_priority``; the
  choice is logged at INFO level on the ``dilated_attention_pytorch`` logger.
- ``segment_lengths`` / ``dilation_rates`` left out (and no ``config``): the kind
  gets :data:`DEFAULT_SEGMENT_LENGTHS` / :data:`DEFAULT_DILATION_RATES`, logged at
  INFO level.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .compat import RingDistributedDilatedAttention
from .config import DilatedAttentionConfig
from .modules import DilatedAttention, MultiheadDilatedAttention
from .ring import (
    EnterpriseDistributedDilatedAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
)
from .validation import check_bool

__all__ = [
    "DEFAULT_DILATION_RATES",
    "DEFAULT_SEGMENT_LENGTHS",
    "AttentionKind",
    "available_attention_kinds",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "register_attention_kind",
]

logger = logging.getLogger("dilated_attention_pytorch")

# The branch schedule a factory call gets when it names none: LongNet's geometric
# shape (w / r = 2048 tokens per head and segment in every branch) up to 8K tokens.
DEFAULT_SEGMENT_LENGTHS = (2048, 4096, 8192)
DEFAULT_DILATION_RATES = (1, 2, 4)


@dataclass(frozen=True)
class AttentionKind:
    """One registered kind.

    Attributes:
        name: the name passed as ``kind=``.
        cls: the module class; its constructor's parameters are the accepted keywords.
        multihead: ``True`` for layers over ``(B, N, E)`` with projections.
        auto_priority: ``kind="auto"`` tries kinds from the highest priority down;
            ``None`` means never chosen by ``"auto"``.
        why_not: returns the reason the kind cannot be built right now (e.g. "torch.distributed
            is not initialized"), or ``None`` when it can. ``None`` means always available.
        description: one line for logs and error messages.
    """

    name: str
    cls: type[nn.Module]
    multihead: bool
    auto_priority: int | None = None
    why_not: Callable[[], str | None] | None = None
    description: str = ""

    def unavailable_reason(self) -> str | None:
        return None if self.why_not is None else self.why_not()


# (multihead, name) -> kind: one name may exist in both families (e.g. "ring").
_KINDS: dict[tuple[bool, str], AttentionKind] = {}


def register_attention_kind(
    name: str,
    cls: type[nn.Module],
    *,
    multihead: bool,
    auto_priority: int | None = None,
    why_not: Callable[[], str | None] | None = None,
    description: str = "",
    replace: bool = False,
) -> AttentionKind:
    """Register ``cls`` under ``name`` (see :class:`AttentionKind` for the arguments).

    Raises:
        ValueError: ``name`` is ``"auto"`` or already registered (pass ``replace=True``
            to overwrite on purpose).
        TypeError: ``cls`` is not an ``nn.Module`` subclass, or another argument has the
            wrong type.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"kind name must be a non-empty str other than 'auto', got {name!r}.")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(
            f"cls must be an nn.Module subclass (the factory builds it with the config's "
            f"arguments), got {cls!r}."
        )
    check_bool("multihead", multihead)
    check_bool("replace", replace)
    if why_not is not None and not callable(why_not):
        raise TypeError(f"why_not must be a callable returning str or None, got {why_not!r}.")
    if auto_priority is not None and (
        isinstance(auto_priority, bool) or not isinstance(auto_priority, int)
    ):
        raise TypeError(f"auto_priority must be an int or None, got {auto_priority!r}.")
    if (multihead, name) in _KINDS and not replace:
        raise ValueError(
            f"attention kind {name!r} is already registered "
            f"({_KINDS[multihead, name].cls.__qualname__}); "
            f"pass replace=True to overwrite it."
        )
    kind = AttentionKind(name, cls, multihead, auto_priority, why_not, description)
    _KINDS[multihead, name] = kind
    return kind


def available_attention_kinds(*, multihead: bool | None = None) -> list[str]:
    """Registered kind names (of one family when ``multihead`` is given), sorted."""
    return sorted({n for (mh, n) in _KINDS if multihead is None or mh == multihead})


def _choose_auto(multihead: bool, caller: str) -> AttentionKind:
    candidates = sorted(
        (k for k in _KINDS.values() if k.multihead == multihead and k.auto_priority is not None),
        key=lambda k: -k.auto_priority,  # type: ignore[operator]
    )
    skipped: list[str] = []
    for kind in candidates:
        reason = kind.unavailable_reason()
        if reason is None:
            note = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            logger.info(
                "%s(kind='auto') chose %r: %s%s",
                caller,
                kind.name,
                kind.description or kind.cls.__qualname__,
                note,
            )
            return kind
        skipped.append(f"{kind.name}: {reason}")
    raise ValueError(
        f"{caller}(kind='auto') found no available kind ({'; '.join(skipped) or 'none registered'})."
    )


def _accepted_keywords(cls: type[nn.Module]) -> tuple[list[str], list[str], bool]:
    """``(accepted, required, takes_var_kwargs)`` of ``cls``'s constructor."""
    accepted, required, var_kwargs = [], [], False
    for p in inspect.signature(cls).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kwargs = True
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            accepted.append(p.name)
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
    return accepted, required, var_kwargs


def _create(
    kind: str,
    *,
    multihead: bool,
    caller: str,
    config: DilatedAttentionConfig | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    if not isinstance(kind, str):
        raise TypeError(f"{caller}: kind must be a str, got {type(kind).__name__} {kind!r}.")
    valid = ["auto", *available_attention_kinds(multihead=multihead)]
    if kind == "auto":
        chosen = _choose_auto(multihead, caller)
    elif (multihead, kind) in _KINDS:
        chosen = _KINDS[multihead, kind]
        reason = chosen.unavailable_reason()
        if reason is not None:
            raise ValueError(f"{caller}: kind {kind!r} cannot be built here: {reason}.")
    elif (not multihead, kind) in _KINDS:
        other = "create_dilated_attention" if multihead else "create_multihead_dilated_attention"
        raise ValueError(
            f"{caller}: kind {kind!r} belongs to {other}(); valid kinds here are {valid}."
        )
    else:
        raise ValueError(f"{caller}: unknown kind {kind!r}; valid kinds are {valid}.")

    if config is not None:
        if not isinstance(config, DilatedAttentionConfig):
            raise TypeError(
                f"{caller}: config must be a DilatedAttentionConfig, got {type(config).__name__}."
            )
        # Explicit keywords override the config's fields.
        base = config.multihead_kwargs() if multihead else config.attention_kwargs()
        kwargs = {**base, **kwargs}

    accepted, required, var_kwargs = _accepted_keywords(chosen.cls)
    schedule = ("segment_lengths", "dilation_rates")
    if "attention" not in kwargs and all(n in accepted and n not in kwargs for n in schedule):
        kwargs = {
            **kwargs,
            "segment_lengths": DEFAULT_SEGMENT_LENGTHS,
            "dilation_rates": DEFAULT_DILATION_RATES,
        }
        logger.info(
            "%s(kind=%r): no segment_lengths/dilation_rates given, using the defaults "
            "segment_lengths=%s, dilation_rates=%s",
            caller,
            chosen.name,
            list(DEFAULT_SEGMENT_LENGTHS),
            list(DEFAULT_DILATION_RATES),
        )
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not var_kwargs:
        raise TypeError(
            f"{caller}(kind={chosen.name!r}) got unexpected keyword argument(s) {unknown}; "
            f"accepted keywords are {accepted}."
        )
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise TypeError(
            f"{caller}(kind={chosen.name!r}) is missing required keyword argument(s) {missing}; "
            f"pass them or a config=DilatedAttentionConfig(...)."
        )
    return chosen.cls(**kwargs)


def create_dilated_attention(
    kind: str = "auto", *, config: DilatedAttentionConfig | None = None, **kwargs: Any
) -> nn.Module:
    """Build an attention module over ``(B, N, H, D)`` tensors.

    Args:
        kind: ``"auto"`` or one of ``available_attention_kinds(multihead=False)``
            (``"dilated"``: :class:`~dilated_attention_pytorch.DilatedAttention`).
        config: optional :class:`DilatedAttentionConfig` supplying the keywords.
        **kwargs: constructor keywords of the kind; they override ``config``.

    Example:
        >>> attn = create_dilated_attention(segment_lengths=[64, 128], dilation_rates=[1, 2])
    """
    return _create(
        kind, multihead=False, caller="create_dilated_attention", config=config, kwargs=kwargs
    )


def create_multihead_dilated_attention(
    kind: str = "auto", *, config: DilatedAttentionConfig | None = None, **kwargs: Any
) -> nn.Module:
    """Build a multi-head attention layer over ``(B, N, E)`` inputs.

    Args:
        kind: ``"auto"`` or one of ``available_attention_kinds(multihead=True)``
            (``"multihead_dilated"``: :class:`~dilated_attention_pytorch.MultiheadDilatedAttention`).
        config: optional :class:`DilatedAttentionConfig` (with ``embed_dim`` and
            ``num_heads``) supplying the keywords.
        **kwargs: constructor keywords of the kind (e.g. ``device``, ``dtype``); they
            override ``config``.

    Example:
        >>> layer = create_multihead_dilated_attention(
        ...     embed_dim=64, num_heads=4, segment_lengths=[64, 128], dilation_rates=[1, 2]
        ... )
    """
    return _create(
        kind,
        multihead=True,
        caller="create_multihead_dilated_attention",
        config=config,
        kwargs=kwargs,
    )


register_attention_kind(
    "dilated",
    DilatedAttention,
    multihead=False,
    auto_priority=0,
    description="single-device dilated attention (DilatedAttention)",
)
register_attention_kind(
    "multihead_dilated",
    MultiheadDilatedAttention,
    multihead=True,
    auto_priority=0,
    description="single-device multi-head dilated attention (MultiheadDilatedAttention)",
)
# Never chosen by kind="auto": the ring needs every rank of its group to call it together.
register_attention_kind(
    "ring",
    StandardRingAttention,
    multihead=False,
    description="ring (sequence-parallel) dilated attention (StandardRingAttention)",
)
for _name in ("ring", "ring_multihead"):
    register_attention_kind(
        _name,
        RingMultiheadDilatedAttention,
        multihead=True,
        description="ring multi-head dilated attention (RingMultiheadDilatedAttention)",
    )
register_attention_kind(
    "multihead_enterprise_distributed",
    EnterpriseDistributedDilatedAttention,
    multihead=True,
    description="multi-head dilated attention for data-parallel training, with monitoring and "
    "checkpointing (EnterpriseDistributedDilatedAttention)",
)
register_attention_kind(
    "multihead_ring_distributed",
    RingDistributedDilatedAttention,
    multihead=True,
    description="deprecated name of 'multihead_enterprise_distributed' (warns when built)",
)
