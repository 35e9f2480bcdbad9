"""The fused gate in eager PyTorch: the default backend, needs no compiler.

Each function takes lists of matrices with their thresholds and
temperatures (1-D tensors, one entry per matrix) and computes, from one mask
per matrix, what the reference (``speechbrain_spg.gate``) computes in
several passes: the gated weight together with the soft-zero count in the
forward pass, both gradients in the backward pass. ``compiled`` hands these
same functions to ``torch.compile``.

Two details differ from the reference, neither in a value that matters:
gated weights below the dtype's smallest normal number are returned as zero
(``flush_subnormal``: x86 CPUs multiply subnormal numbers slowly), and on a
CPU without autocast the backward reads the mask back from the gated weight
it kept (``M = (W * M) / W``) instead of computing the sigmoid again.

Authors
 * speechbrain-spg developers 2026
"""

import torch

from speechbrain_spg.gate import chain_rule, soft_mask


def row_sums(x):
    """Sums over the last dimension on CUDA, the whole sum elsewhere.

    On CUDA a reduction of a whole matrix fused with an element-wise output
    compiles into a kernel that one thread block runs alone, while rows
    reduce in parallel; the caller adds the partial sums up.

    Arguments
    ---------
    x : torch.Tensor
        A matrix (or any tensor on a CPU).

    Returns
    -------
    torch.Tensor
        Row sums (CUDA) or the 0-d sum.

    Example
    -------
    >>> row_sums(torch.ones(2, 3))
    tensor(6.)
    """
    return x.sum(dim=-1) if x.is_cuda else x.sum()


def flush_subnormal(x):
    """``x`` with its subnormal values set to zero.

    A pinched weight's ``W * M`` can be subnormal; the matrix products of
    the forward and backward passes then take a slow path on x86 CPUs for
    every vector that holds one. Zero differs from such a value by less
    than the dtype's smallest normal number.

    Arguments
    ---------
    x : torch.Tensor
        Floating-point tensor.

    Returns
    -------
    torch.Tensor
        Same dtype and shape.

    Example
    -------
    >>> flush_subnormal(torch.tensor([1e-39, -1e-39, 1e-37, 0.5]))
    tensor([0.0000e+00, 0.0000e+00, 1.0000e-37, 5.0000e-01])
    """
    return torch.where(x.abs() < torch.finfo(x.dtype).tiny, 0.0, x)


def mask_from_gated(weight, gated, threshold, tau):
    """The mask read back from ``gated = W * M`` by a division.

    Where ``|W * M|`` is below the smallest normal number (``W`` zero or
    tiny, or ``M`` negligible) the quotient loses its precision; there the
    mask at ``W = 0`` is used, which equals ``M`` to float32 precision when
    ``W`` is tiny, and both are negligible otherwise.

    Arguments
    ---------
    weight : torch.Tensor
        The weight matrix ``W``.
    gated : torch.Tensor
        ``W * M`` as the forward pass returned it.
    threshold : torch.Tensor
        The absolute threshold ``t``.
    tau : torch.Tensor
        The temperature.

    Returns
    -------
    torch.Tensor
        ``M``.

    Example
    -------
    >>> w, t, tau = torch.tensor([0.0, 0.5, 2.0]), torch.tensor(1.0), 0.25
    >>> m = soft_mask(w, t, tau)
    >>> torch.allclose(mask_from_gated(w, w * m, t, tau), m)
    True
    """
    at_zero = torch.sigmoid(-threshold * threshold / (2 * tau))
    tiny = torch.finfo(gated.dtype).tiny
    return torch.where(gated.abs() >= tiny, gated / weight, at_zero)


def forward(weights, thresholds, taus, dtype=None):
    """Gated weights and soft-zero counts, one mask per matrix.

    Arguments
    ---------
    weights, thresholds, taus
        As in ``kernels.gate_matrices``.
    dtype : torch.dtype, optional
        Return the gated weights in this dtype (autocast's).

    Returns
    -------
    gated : list of torch.Tensor
        ``W * M`` of every matrix.
    zeros : torch.Tensor
        ``sum(1 - M)`` of every matrix (1-D).

    Example
    -------
    >>> gated, zeros = forward([torch.tensor([0.1, 2.0])],
    ...                        torch.tensor([0.5]), torch.tensor([0.05]))
    >>> gated[0], zeros
    (tensor([0.0083, 2.0000]), tensor([0.9168]))
    """
    gated, zeros = [], []
    for i, weight in enumerate(weights):
        mask = soft_mask(weight, thresholds[i], taus[i])
        out = flush_subnormal(weight * mask)
        gated.append(out if dtype is None else out.to(dtype))
        zeros.append(weight.numel() - row_sums(mask).sum())
    return gated, torch.stack(zeros)


def _backward(weights, masks, thresholds, taus, grads, grad_zeros):
    """Weight gradients written into ``grads``; threshold gradients."""
    grad_thresholds = []
    for i, (weight, mask) in enumerate(zip(weights, masks)):
        factor, grad_threshold = chain_rule(
            weight,
            mask,
            thresholds[i],
            taus[i],
            grads[i],
            grad_zeros[i],
            row_sums,
        )
        grads[i].mul_(factor)
        grad_thresholds.append(grad_threshold.sum())
    return torch.stack(grad_thresholds)


def backward(weights, thresholds, taus, grads, grad_zeros):
    """Backward that computes the masks again; ``grads`` (in the weights'
    dtype) become the weight gradients.

    Arguments
    ---------
    weights : list of torch.Tensor
        The matrices.
    thresholds, taus : torch.Tensor
        As in ``forward``.
    grads : list of torch.Tensor
        Gradients of the gated weights; overwritten.
    grad_zeros : torch.Tensor
        Gradients of the soft-zero counts (1-D).

    Returns
    -------
    torch.Tensor
        The threshold gradients (1-D).

    Example
    -------
    >>> grads = [torch.ones(2)]
    >>> backward([torch.tensor([0.0, 3.0])], torch.tensor([1.0]),
    ...          torch.tensor([0.05]), grads, torch.zeros(1)).abs()
    tensor([0.])
    >>> grads[0].round(decimals=3)
    tensor([0., 1.])
    """
    masks = [
        soft_mask(w, thresholds[i], taus[i]) for i, w in enumerate(weights)
    ]
    return _backward(weights, masks, thresholds, taus, grads, grad_zeros)


def backward_from_gated(weights, gated, thresholds, taus, grads, grad_zeros):
    """Backward that reads the masks back from the gated weights
    (``mask_from_gated``); otherwise as ``backward``.

    Arguments
    ---------
    weights, thresholds, taus, grads, grad_zeros
        As in ``backward``.
    gated : list of torch.Tensor
        The gated weights ``forward`` returned.

    Returns
    -------
    torch.Tensor
        The threshold gradients (1-D).

    Example
    -------
    >>> w, t, tau = [torch.tensor([0.5, 3.0])], torch.tensor([1.0]), torch.tensor([0.5])
    >>> gated, _ = forward(w, t, tau)
    >>> a, b = [torch.ones(2)], [torch.ones(2)]
    >>> torch.allclose(backward_from_gated(w, gated, t, tau, a, torch.ones(1)),
    ...                backward(w, t, tau, b, torch.ones(1)))
    True
    """
    masks = [
        mask_from_gated(w, gated[i], thresholds[i], taus[i])
        for i, w in enumerate(weights)
    ]
    return _backward(weights, masks, thresholds, taus, grads, grad_zeros)


def backward_upcast(weights, thresholds, taus, grads, grad_zeros):
    """Backward from gradients in a lower precision than the weights (the
    gated weights were returned in autocast's dtype).

    Arguments
    ---------
    weights, thresholds, taus, grad_zeros
        As in ``backward``.
    grads : list of torch.Tensor
        Low-precision gradients of the gated weights (read only).

    Returns
    -------
    grad_weights : list of torch.Tensor
        Weight gradients in the weights' dtype.
    grad_thresholds : torch.Tensor
        1-D.

    Example
    -------
    >>> g, _ = backward_upcast([torch.tensor([0.0, 3.0])], torch.tensor([1.0]),
    ...                        torch.tensor([0.05]), [torch.ones(2).half()],
    ...                        torch.zeros(1))
    >>> g[0].round(decimals=3)
    tensor([0., 1.])
    """
    grads = [g.to(w.dtype, copy=True) for g, w in zip(grads, weights)]
    grad_thresholds = backward(weights, thresholds, taus, grads, grad_zeros)
    return grads, grad_thresholds


def soft_zeros(weights, thresholds, taus):
    """Soft-zero counts and the sums of their threshold slopes, for
    matrices a forward pass did not gate (a block skipped by LayerDrop).

    Arguments
    ---------
    weights : list of torch.Tensor
        The matrices.
    thresholds, taus : torch.Tensor
        As in ``forward``.

    Returns
    -------
    counts : torch.Tensor
        ``sum(1 - M)`` of every matrix (1-D).
    slopes : torch.Tensor
        ``sum(M (1 - M) / tau)`` of every matrix (1-D): the count's
        derivative in ``t`` divided by ``t``.

    Example
    -------
    >>> counts, slopes = soft_zeros([torch.tensor([0.0, 3.0])],
    ...                             torch.tensor([1.0]), torch.tensor([0.05]))
    >>> counts.round(decimals=3)
    tensor([1.])
    """
    counts, slopes = [], []
    for i, weight in enumerate(weights):
        mask = soft_mask(weight, thresholds[i], taus[i])
        counts.append(weight.numel() - row_sums(mask).sum())
        slopes.append(row_sums(mask * (1 - mask) / taus[i]).sum())
    return torch.stack(counts), torch.stack(slopes)
