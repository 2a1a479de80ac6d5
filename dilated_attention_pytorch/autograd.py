"""Helpers shared by the library's ``torch.autograd.Function`` classes."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch._C import _functions

__all__ = ["first_order_only"]


def _message(what: str) -> bytes:
    return (
        f"{what} does not support double backward: a gradient it computed was "
        "differentiated again (create_graph=True, e.g. a gradient penalty or a "
        "Hessian-vector product), but its backward is a hand-written kernel whose result "
        "has no graph. Use first-order gradients only, or, for small inputs, "
        "dilated_attention_pytorch.dense_dilated_attention (the dense reference, O(N^2) "
        "memory), which is differentiable to any order."
    ).encode()


def first_order_only(what: str) -> Callable:
    """Decorate an ``autograd.Function.backward`` whose result cannot be differentiated.

    The backward runs under ``no_grad``. When autograd asks for a graph of the gradients
    (``create_graph=True``, or ``torch.func`` transforms) and an input or a saved tensor
    requires grad, the gradients are returned behind a node that raises a clear
    ``RuntimeError`` naming ``what`` if they are ever differentiated, instead of silently
    having no graph (``once_differentiable`` only does so when the incoming gradient
    itself requires grad, so a gradient penalty on ``q`` would be dropped without a word).
    First-order uses, ``torch.func.grad`` included, are unaffected.
    """

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            inputs = (*grads, *ctx.saved_tensors)
            if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
                return outputs
            single = not isinstance(outputs, tuple)
            outputs = (outputs,) if single else outputs
            raising = _functions.DelayedError(_message(what), len(outputs))

            def alias(t):
                if t is None:
                    return None
                t = t.detach()
                t.requires_grad = True
                return t

            wrapped = raising(*[alias(t) for t in outputs])
            return wrapped[0] if single else wrapped

        return wrapper

    return decorate
