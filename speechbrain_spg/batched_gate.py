"""Several gated matrices in one call forward and one call backward.

The per-matrix fused gate (``fused_gate.FusedPinchFunction``) costs little
on the device but a lot on the host: each gated matrix makes a few small
threshold operations, an autograd function call, a compiled-kernel call
(guards and wrappers) and their backward counterparts. On an H100 the
device was busy 98 ms of a 189 ms HuBERT-large step (144 gated matrices,
dense step 102 ms): the rest was the host (see ``benchmarks/RESULTS.md``).

``FusedPinchAllFunction`` gates several matrices in one call (the lobes use
one transformer block: ``gates.pregated_weights``, on the block's first use):
one autograd node and one compiled call that launches the kernels of every
matrix from generated code, and the same once in the backward pass, which
runs when the gradients of all its gated weights are in. On a GPU with
Triton, float32 weights are gated by hand-written kernels instead, one
launch for the whole block (``triton_gate``; ``batch_kernels_for`` picks).
The math is the per-matrix fused math (``fused_gate``), so the numbers are
the same. The layers then only pick up their gated weight
(``GatedLinear.pregated``).

Authors
 * speechbrain-spg developers 2026
"""

import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from speechbrain_spg import triton_gate
from speechbrain_spg.fused_gate import (
    _backward_from_gated_math_inplace,
    _backward_math_inplace,
    _backward_upcast_math,
    _can_overwrite,
    _forward_math,
    _resolve_policy,
    _run_backward,
    _run_forward,
    _with_eager_fallback,
)


def _forward_all_math(weights, thresholds, taus, dtype=None):
    """Gated weights (cast to ``dtype`` if given) and the soft-zero count
    of every matrix (a vector)."""
    gated, zeros = [], []
    for i, weight in enumerate(weights):
        out, mask_rows = _forward_math(weight, thresholds[i], taus[i], dtype)
        gated.append(out)
        zeros.append(weight.numel() - mask_rows.sum())
    return gated, torch.stack(zeros)


def _backward_all_math_inplace(weights, thresholds, taus, grads, grad_zeros):
    """Recomputing backward of every matrix; ``grads`` become the weight
    gradients; returns the threshold gradients (a vector)."""
    return torch.stack(
        [
            _backward_math_inplace(
                weight, thresholds[i], taus[i], grads[i], grad_zeros[i]
            ).sum()
            for i, weight in enumerate(weights)
        ]
    )


def _backward_all_upcast_math(weights, thresholds, taus, grads, grad_zeros):
    """Recomputing backward of every matrix from lower-precision
    gradients: weight gradients (new tensors) and threshold gradients."""
    grad_weights, grad_thresholds = [], []
    for i, weight in enumerate(weights):
        grad_weight, rows = _backward_upcast_math(
            weight, thresholds[i], taus[i], grads[i], grad_zeros[i]
        )
        grad_weights.append(grad_weight)
        grad_thresholds.append(rows.sum())
    return grad_weights, torch.stack(grad_thresholds)


def _backward_all_from_gated_math_inplace(
    weights, gated, thresholds, taus, grads, grad_zeros
):
    """Backward of every matrix reading the mask back from ``W * M``;
    ``grads`` become the weight gradients; returns the threshold
    gradients."""
    return torch.stack(
        [
            _backward_from_gated_math_inplace(
                weight,
                gated[i],
                thresholds[i],
                taus[i],
                grads[i],
                grad_zeros[i],
            ).sum()
            for i, weight in enumerate(weights)
        ]
    )


@dataclass(frozen=True)
class BatchKernels:
    """The math of ``FusedPinchAllFunction``, compiled or eager.

    Arguments
    ---------
    forward : callable
        ``(Ws, ts, taus, dtype=None) -> (gated Ws, soft-zero counts)``.
    backward : callable
        ``(Ws, ts, taus, grads, grad_zeros) -> grad_ts``; ``grads`` become
        the weight gradients.
    backward_upcast : callable
        ``(Ws, ts, taus, grads, grad_zeros) -> (grad_Ws, grad_ts)`` for
        lower-precision ``grads``.
    backward_from_gated : callable
        ``(Ws, gated Ws, ts, taus, grads, grad_zeros) -> grad_ts``, same
        contract as ``backward``.
    compiled : bool
        Whether compiled kernels are asked for: ``torch.compile`` (each
        call falls back to the eager math if compiling fails) or Triton
        (``triton_gate``).

    Example
    -------
    >>> kernels = compiled_batch_kernels("cpu")
    >>> gated, zeros = kernels.forward(
    ...     [torch.ones(2, 3), torch.zeros(1, 2)],
    ...     torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]),
    ... )
    >>> [tuple(w.shape) for w in gated], [round(z, 3) for z in zeros.tolist()]
    ([(2, 3), (1, 2)], [2.265, 1.0])
    """

    forward: object
    backward: object
    backward_upcast: object
    backward_from_gated: object
    compiled: bool


EAGER_BATCH_KERNELS = BatchKernels(
    _forward_all_math,
    _backward_all_math_inplace,
    _backward_all_upcast_math,
    _backward_all_from_gated_math_inplace,
    compiled=False,
)


@functools.cache
def compiled_batch_kernels(device_type):
    """``torch.compile``-d batch kernels (eager where compiling fails).

    Arguments
    ---------
    device_type : str
        ``"cpu"`` or ``"cuda"`` (one cache entry each).

    Returns
    -------
    BatchKernels
        Compiled on first use, for the matrices of that call (a model's
        gate always passes the same list).

    Example
    -------
    >>> compiled_batch_kernels("cpu").compiled
    True
    """
    eager = (
        EAGER_BATCH_KERNELS.forward,
        EAGER_BATCH_KERNELS.backward,
        EAGER_BATCH_KERNELS.backward_upcast,
        EAGER_BATCH_KERNELS.backward_from_gated,
    )
    compiled = [torch.compile(f, dynamic=True, fullgraph=True) for f in eager]
    return BatchKernels(
        *map(_with_eager_fallback, compiled, eager), compiled=True
    )


def batch_kernels_for(weights, compiled):
    """The batch kernels that gate ``weights``.

    Arguments
    ---------
    weights : list of torch.Tensor
        The matrices of one call.
    compiled : bool
        Whether the gate asks for compiled kernels (``impl: compiled``).

    Returns
    -------
    BatchKernels
        Compiled: the hand-written Triton kernels where they apply
        (``triton_gate.supports``: float32 CUDA weights), else the
        ``torch.compile`` ones of the device. Otherwise the eager math.

    Example
    -------
    >>> batch_kernels_for([torch.zeros(2, 2)], compiled=False).compiled
    False
    >>> batch_kernels_for([torch.zeros(2, 2)], True) is compiled_batch_kernels("cpu")
    True
    """
    if not compiled:
        return EAGER_BATCH_KERNELS
    fallback = compiled_batch_kernels(weights[0].device.type)
    if triton_gate.supports(weights):
        return triton_gate.triton_batch_kernels(fallback)
    return fallback


class FusedPinchAllFunction(torch.autograd.Function):
    """``(soft-zero counts, W_1 * M_1, ..., W_n * M_n)`` in one call.

    The counts (a vector) are differentiable in the thresholds only, as
    with ``FusedPinchFunction``. A matrix whose gated weight gets no
    gradient (a block skipped by LayerDrop) gets no weight gradient
    (``None``, as on the reference path); its threshold still gets the
    gradient of its soft-zero count.

    Example
    -------
    >>> w = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ...      for _ in range(2)]
    >>> t = torch.tensor([0.4, 0.7], dtype=torch.float64, requires_grad=True)
    >>> tau = torch.tensor([0.05, 0.1], dtype=torch.float64)
    >>> def gate(t, *w):
    ...     return FusedPinchAllFunction.apply(
    ...         t, tau, EAGER_BATCH_KERNELS, None, None, *w)
    >>> torch.autograd.gradcheck(lambda t, *w: gate(t, *w)[1:], (t, *w))
    True
    >>> plain = [x.detach() for x in w]
    >>> torch.autograd.gradcheck(lambda t: gate(t, *plain)[0], (t,))
    True
    """

    @staticmethod
    def forward(
        ctx, thresholds, taus, kernels, recompute_mask, out_dtype, *weights
    ):
        """Gated weights and soft-zero counts of every matrix.

        Arguments
        ---------
        ctx : context
            Autograd context.
        thresholds : torch.Tensor
            Absolute threshold of each matrix (1-D).
        taus : torch.Tensor
            Temperature of each matrix (1-D).
        kernels : BatchKernels
            Compiled or eager math.
        recompute_mask : bool, optional
            As in ``FusedPinchFunction`` (default:
            ``default_recompute_mask`` of the first matrix).
        out_dtype : torch.dtype, optional
            Return the gated weights in this dtype (autocast's), which
            always recomputes the mask in the backward.
        *weights : torch.Tensor
            The weight matrices.

        Returns
        -------
        tuple
            Soft-zero counts (1-D), then the gated weights in order.
        """
        weights = list(weights)
        out_dtype, recompute_mask = _resolve_policy(
            weights[0], out_dtype, recompute_mask
        )
        gated, zeros = _run_forward(
            kernels, weights, thresholds, taus, out_dtype
        )
        # Unused outputs give None gradients, not zeros: their weights
        # then get no gradient, as on the reference path.
        ctx.set_materialize_grads(False)
        ctx.kernels, ctx.recompute_mask = kernels, recompute_mask
        ctx.count = len(weights)
        ctx.gated_dtype = gated[0].dtype
        kept = [] if recompute_mask else gated
        ctx.save_for_backward(thresholds, taus, *weights, *kept)
        return (zeros, *gated)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_zeros, *grad_gated):
        """Gradients of every weight and threshold in one call.

        Arguments
        ---------
        ctx : context
            Autograd context.
        grad_zeros : torch.Tensor
            Gradient of the soft-zero counts.
        *grad_gated : torch.Tensor
            Gradient of each gated weight (None where unused).

        Returns
        -------
        tuple
            Gradient of the thresholds, ``None`` for ``taus`` and the
            options, then one weight gradient per matrix.
        """
        thresholds, taus, *saved = ctx.saved_tensors
        weights, gated = saved[: ctx.count], saved[ctx.count :]
        if grad_zeros is None:
            grad_zeros = torch.zeros_like(thresholds)
        used = [grad is not None for grad in grad_gated]
        upcast = ctx.recompute_mask and ctx.gated_dtype != weights[0].dtype
        grads = []
        for weight, grad in zip(weights, grad_gated):
            if grad is None:
                grad = torch.zeros_like(weight, dtype=ctx.gated_dtype)
            if not upcast and not _can_overwrite(grad, weight):
                grad = grad.to(weight.dtype, copy=True).contiguous()
            grads.append(grad)
        grads, grad_thresholds = _run_backward(
            ctx.kernels,
            upcast,
            ctx.recompute_mask,
            weights,
            gated,
            thresholds,
            taus,
            grads,
            grad_zeros,
        )
        grad_weights = [
            grad if use and ctx.needs_input_grad[5 + i] else None
            for i, (grad, use) in enumerate(zip(grads, used))
        ]
        grad_thresholds = grad_thresholds.to(thresholds.dtype)
        return (grad_thresholds, None, None, None, None, *grad_weights)
