"""The self-pinching gate: the formula, its gradient, the soft-zero count.

A gated weight matrix ``W`` is used as ``W * M`` with the soft mask

    M = sigmoid((W^2 - t^2) / (2 * tau))

where ``t`` is one learnable threshold shared by a tie group of matrices and
``tau`` a small temperature. Weights whose magnitude is below ``t`` are
"pinched" towards zero; the pruning at the end keeps ``|W| > |t|``.

With ``slope = dM/d(W^2) * 2 = M (1 - M) / tau`` the chain rule gives

    d(W M)/dW = M + W^2 slope,      d(W M)/dt = -t W slope,
    d sum(1 - M)/dt = t sum(slope).

This module is the reference every fast backend (``speechbrain_spg.kernels``)
is tested against: the functions here are plain PyTorch, differentiable by
autograd; the eager and compiled backends call ``chain_rule`` for their
backward, and the Triton kernels compute the same expressions.

Authors
 * speechbrain-spg developers 2026
"""

import torch

#: Upper clip of the sigmoid's argument. Above it the sigmoid is exactly 1 in
#: every floating dtype (from 8.3 in float16, 16.6 in float32, 36.7 in
#: float64), so no value changes; without it ``exp(-x)`` is a subnormal
#: number for some weights far above their threshold, which x86 CPUs compute
#: through a slow microcode path. An int, so that ``torch.compile`` takes it
#: as a constant.
SIGMOID_SATURATION = 80


def pinch_argument(weight, threshold, tau):
    """The sigmoid's argument ``(W^2 - t^2) / (2 tau)``, clipped above at
    ``SIGMOID_SATURATION``.

    Arguments
    ---------
    weight : torch.Tensor
        The weight matrix ``W``.
    threshold : torch.Tensor or float
        The absolute threshold ``t`` (its sign does not matter).
    tau : torch.Tensor or float
        The temperature (positive).

    Returns
    -------
    torch.Tensor
        Same shape as ``weight``.

    Example
    -------
    >>> pinch_argument(torch.tensor([0.0, 1.0, 10.0]), 0.5, 0.125)
    tensor([-1.,  3., 80.])
    """
    return pinch_argument_of_square(weight * weight, threshold, tau)


def pinch_argument_of_square(square, threshold, tau):
    """The sigmoid's argument ``(s^2 - t^2) / (2 tau)`` from ``s^2``, clipped
    as in ``pinch_argument``: the structured gates score a whole unit (an
    attention head, a feed-forward unit) by a mean square ``s^2``.

    Arguments
    ---------
    square : torch.Tensor
        ``W^2``, or a unit's score ``s^2`` (non-negative).
    threshold, tau : torch.Tensor or float
        As in ``pinch_argument``.

    Returns
    -------
    torch.Tensor
        Same shape as ``square``.

    Example
    -------
    >>> pinch_argument_of_square(torch.tensor([0.0, 1.0]), 0.5, 0.125)
    tensor([-1.,  3.])
    """
    x = (square - threshold * threshold) / (2 * tau)
    return x.clamp(max=SIGMOID_SATURATION)


def soft_mask(weight, threshold, tau):
    """The soft mask ``M = sigmoid((W^2 - t^2) / (2 tau))``.

    Arguments
    ---------
    weight, threshold, tau : torch.Tensor or float
        ``W``, ``t`` and ``tau``, as in ``pinch_argument``.

    Returns
    -------
    torch.Tensor
        Same shape as ``weight``, values in [0, 1].

    Example
    -------
    >>> soft_mask(torch.tensor([0.0, 1.0, 3.0]), 1.0, 0.01).round(decimals=4)
    tensor([0.0000, 0.5000, 1.0000])
    """
    return torch.sigmoid(pinch_argument(weight, threshold, tau))


def soft_mask_of_square(square, threshold, tau):
    """The soft mask ``sigmoid((s^2 - t^2) / (2 tau))`` of the scores ``s^2``
    of whole units (structured gates; ``soft_mask`` for single weights).

    Arguments
    ---------
    square, threshold, tau : torch.Tensor or float
        As in ``pinch_argument_of_square``.

    Returns
    -------
    torch.Tensor
        Same shape as ``square``, values in [0, 1].

    Example
    -------
    >>> soft_mask_of_square(torch.tensor([0.0, 1.0, 9.0]), 1.0, 0.01).round(decimals=4)
    tensor([0.0000, 0.5000, 1.0000])
    """
    return torch.sigmoid(pinch_argument_of_square(square, threshold, tau))


def hard_mask_of_square(square, threshold):
    """The units the pruning keeps: ``s^2 > t^2`` (``hard_mask`` for single
    weights).

    Arguments
    ---------
    square : torch.Tensor
        Scores ``s^2`` of the units.
    threshold : torch.Tensor or float
        The absolute threshold ``t``.

    Returns
    -------
    torch.Tensor
        Boolean, ``True`` where the unit is kept.

    Example
    -------
    >>> hard_mask_of_square(torch.tensor([0.25, 4.0]), -1.0)
    tensor([False,  True])
    """
    return square > threshold * threshold


def hard_mask(weight, threshold):
    """The mask ``|W| > |t|`` that the pruning at the end applies.

    Arguments
    ---------
    weight : torch.Tensor
        The weight matrix ``W``.
    threshold : torch.Tensor or float
        The absolute threshold ``t``.

    Returns
    -------
    torch.Tensor
        Boolean, ``True`` where the weight is kept.

    Example
    -------
    >>> hard_mask(torch.tensor([-2.0, 0.5, 1.5]), -1.0)
    tensor([ True, False,  True])
    """
    return weight.abs() > abs(threshold)


def gated_weight(weight, threshold, tau):
    """The gated weight ``W * M``, differentiable in ``W`` and ``t``.

    Arguments
    ---------
    weight, threshold, tau : torch.Tensor or float
        ``W``, ``t`` and ``tau``, as in ``pinch_argument``.

    Returns
    -------
    torch.Tensor
        ``W * M``, in ``weight``'s shape and dtype.

    Example
    -------
    >>> w = torch.tensor([0.0, 0.5, 1.0, 3.0])
    >>> gated_weight(w, torch.tensor(1.0), 0.01).round(decimals=4)
    tensor([0.0000, 0.0000, 0.5000, 3.0000])
    """
    return weight * soft_mask(weight, threshold, tau)


def soft_zero_count(weight, threshold, tau):
    """Expected number of pinched weights, ``sum(1 - M)``.

    Differentiable in ``t`` only: the sparsity regulariser moves the
    thresholds, the task loss moves the weights.

    Arguments
    ---------
    weight, threshold, tau : torch.Tensor or float
        As in ``pinch_argument`` (``W`` is not differentiated).

    Returns
    -------
    torch.Tensor
        Scalar.

    Example
    -------
    >>> t = torch.tensor(1.0, requires_grad=True)
    >>> soft_zero_count(torch.tensor([0.0, 0.1, 3.0]), t, 0.01)
    tensor(2., grad_fn=<SumBackward0>)
    """
    return (1 - soft_mask(weight.detach(), threshold, tau)).sum()


def chain_rule(weight, mask, threshold, tau, grad, grad_zeros, reduce=None):
    """The gradients of ``W * M`` and ``sum(1 - M)`` from the mask.

    Arguments
    ---------
    weight : torch.Tensor
        The weight matrix ``W``.
    mask : torch.Tensor
        Its soft mask ``M``.
    threshold : torch.Tensor
        The absolute threshold ``t`` (scalar).
    tau : torch.Tensor or float
        The temperature.
    grad : torch.Tensor
        Gradient of the loss with respect to ``W * M``.
    grad_zeros : torch.Tensor or float
        Gradient of the loss with respect to ``sum(1 - M)``.
    reduce : callable, optional
        How the threshold gradient's terms are summed (default: the whole
        sum; a backend may return partial sums, e.g. per row).

    Returns
    -------
    factor : torch.Tensor
        ``d(W M)/dW``: the weight gradient is ``grad * factor``.
    grad_threshold : torch.Tensor
        The threshold gradient (summed with ``reduce``).

    Example
    -------
    >>> w = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    >>> t = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    >>> gated_weight(w, t, 0.1).sum().backward()
    >>> m = soft_mask(w.detach(), t.detach(), 0.1)
    >>> factor, grad_t = chain_rule(w.detach(), m, t.detach(), 0.1, 1.0, 0.0)
    >>> torch.allclose(factor, w.grad), torch.allclose(grad_t, t.grad)
    (True, True)
    """
    reduce = torch.sum if reduce is None else reduce
    slope = mask * (1 - mask) / tau
    grad_threshold = threshold * reduce(slope * (grad_zeros - grad * weight))
    return mask + weight * weight * slope, grad_threshold
