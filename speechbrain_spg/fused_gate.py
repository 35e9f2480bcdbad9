"""Fast path of the self-pinching gate: one fused pass forward, one backward.

The reference implementation (``gates.PinchFunction`` for the gated weight,
plus ``gates.SoftZerosFunction`` for the sparsity regulariser) reads the
gated weights about a dozen times per training step, and the soft-sparsity
term recomputes the mask in a separate pass. ``FusedPinchFunction`` computes
the gated weight AND the expected number of pinched weights from the same
mask in one forward pass, saves only ``W`` and ``t``, and produces the
gradients of both outputs (weights and threshold) from one recomputation of
the mask in backward.

Where ``torch.compile`` works (a C++ compiler on CPU, Triton on CUDA) the
element-wise math is compiled into single kernels; otherwise the same math
runs as eager in-place PyTorch operations. Both give the reference numbers
within float32 rounding.

Authors
 * speechbrain-spg developers 2026
"""

import functools

import torch


def _forward_math(weight, threshold, tau):
    """Gated weight and sum of the mask, from one mask computation."""
    mask = torch.sigmoid((weight * weight - threshold * threshold) / (2 * tau))
    return weight * mask, mask.sum()


def _backward_math(weight, threshold, tau, grad_out, grad_zeros):
    """Gradients of the gated weight and of the soft-zero count."""
    mask = torch.sigmoid((weight * weight - threshold * threshold) / (2 * tau))
    slope = mask * (1 - mask) / tau
    grad_weight = grad_out * (mask + weight * weight * slope)
    # d(W*M)/dt = -t W slope ; d(sum(1 - M))/dt = t * slope (summed)
    grad_threshold = threshold * (
        grad_zeros * slope.sum() - (grad_out * weight * slope).sum()
    )
    return grad_weight, grad_threshold


@functools.cache
def compiled_kernels(device_type):
    """Compiled forward/backward math for a device type, or eager fallbacks.

    Arguments
    ---------
    device_type : str
        ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    tuple
        ``(forward, backward, compiled)``; ``compiled`` says whether
        ``torch.compile`` succeeded on a probe.

    Example
    -------
    >>> forward, backward, compiled = compiled_kernels("cpu")
    >>> out, total = forward(torch.ones(2), torch.tensor(0.0), torch.tensor(1.0))
    >>> round(float(total), 4)
    1.2449
    """
    try:
        forward = torch.compile(_forward_math, dynamic=True, fullgraph=True)
        backward = torch.compile(_backward_math, dynamic=True, fullgraph=True)
        probe = torch.ones(4, device=device_type)
        scalar = torch.tensor(0.5, device=device_type)
        forward(probe, scalar, scalar)
        backward(probe, scalar, scalar, probe, scalar)
        return forward, backward, True
    except Exception:  # noqa: BLE001 - any compiler problem: stay eager
        return _forward_math, _backward_math, False


class FusedPinchFunction(torch.autograd.Function):
    """``(W * M, sum(1 - M))`` in one pass, gradients in one pass.

    The soft-zero count is differentiable in ``t`` only (the sparsity
    regulariser moves thresholds; the task loss moves the weights), exactly
    like ``gates.SoftZerosFunction``.

    Example
    -------
    >>> w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    >>> t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    >>> tau = torch.tensor(0.05, dtype=torch.float64)
    >>> gated = lambda w, t: FusedPinchFunction.apply(w, t, tau, False)[0]
    >>> torch.autograd.gradcheck(gated, (w, t))
    True
    >>> zeros = lambda t: FusedPinchFunction.apply(w.detach(), t, tau, False)[1]
    >>> torch.autograd.gradcheck(zeros, (t,))
    True
    """

    @staticmethod
    def forward(ctx, weight, threshold, tau, compiled=False):
        """Gated weight and expected number of pinched weights.

        Arguments
        ---------
        ctx : context
            Autograd context.
        weight : torch.Tensor
            The weight matrix.
        threshold : torch.Tensor
            Scalar absolute threshold.
        tau : torch.Tensor
            Scalar temperature.
        compiled : bool
            Use the ``torch.compile`` kernels when they are available.

        Returns
        -------
        gated : torch.Tensor
            ``W * M``.
        soft_zeros : torch.Tensor
            Scalar ``sum(1 - M)``.
        """
        forward, backward, _ = (
            compiled_kernels(weight.device.type)
            if compiled
            else (_forward_math, _backward_math, False)
        )
        ctx.save_for_backward(weight, threshold, tau)
        ctx.backward_math = backward
        gated, mask_sum = forward(weight, threshold, tau)
        return gated, weight.numel() - mask_sum

    @staticmethod
    def backward(ctx, grad_gated, grad_zeros):
        """Gradients of weight and threshold from one mask recomputation.

        Arguments
        ---------
        ctx : context
            Autograd context.
        grad_gated : torch.Tensor
            Gradient with respect to ``W * M``.
        grad_zeros : torch.Tensor
            Gradient with respect to the soft-zero count.

        Returns
        -------
        tuple
            Gradients of ``weight`` and ``threshold``; ``None`` for the rest.
        """
        weight, threshold, tau = ctx.saved_tensors
        if grad_gated is None:
            grad_gated = torch.zeros_like(weight)
        if grad_zeros is None:
            grad_zeros = torch.zeros(
                (), dtype=weight.dtype, device=weight.device
            )
        grad_weight, grad_threshold = ctx.backward_math(
            weight, threshold, tau, grad_gated, grad_zeros
        )
        if not ctx.needs_input_grad[0]:
            grad_weight = None
        return grad_weight, grad_threshold.to(threshold.dtype), None, None
