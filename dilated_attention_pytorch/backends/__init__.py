"""Backends: each computes a plan's branches and says why it cannot run a call."""

from .base import (
    AttentionCall,
    Backend,
    ForwardContext,
    available_backends,
    get_backend,
    register_backend,
    select_backend,
)
from .reference import ReferenceBackend

__all__ = [
    "AttentionCall",
    "Backend",
    "ForwardContext",
    "ReferenceBackend",
    "available_backends",
    "get_backend",
    "register_backend",
    "select_backend",
]

try:  # the triton backend registers itself on import; absent when triton is not installed
    from . import triton_backend  # noqa: F401
except ImportError:
    pass
