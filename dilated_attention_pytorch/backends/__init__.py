"""Backends: each declares what it supports and computes a plan's branches.

``available_backends()`` lists the registered ones: ``"triton"`` (fused kernels, CUDA,
registered when Triton is installed) and ``"pytorch"`` (PyTorch ops, any device).
"""

from .base import (
    AttentionCall,
    Backend,
    BackendChoice,
    BlockOps,
    Capabilities,
    ForwardContext,
    available_backends,
    choose_backend,
    get_backend,
    register_backend,
    select_backend,
)
from .pytorch import PyTorchBackend

__all__ = [
    "AttentionCall",
    "Backend",
    "BackendChoice",
    "BlockOps",
    "Capabilities",
    "ForwardContext",
    "PyTorchBackend",
    "available_backends",
    "choose_backend",
    "get_backend",
    "register_backend",
    "select_backend",
]

import importlib.util

if importlib.util.find_spec("triton") is not None:  # the triton backend registers on import
    from . import triton  # noqa: F401
