"""Fast backends of the self-pinching gate, behind one interface.

A backend is a ``GateKernels``: five functions over lists of matrices that
compute, in one pass each, what ``speechbrain_spg.gate`` computes in
several (gated weights with their soft-zero counts; the gradients of both).
``select_kernels`` picks one from ``gate_impl`` and the weights' device:

- ``"fused"``: ``eager`` (plain PyTorch operations; needs no compiler);
- ``"compiled"``: ``triton`` for float32 CUDA weights where Triton is
  installed, else ``compiled`` (``torch.compile`` of the eager functions);
- ``"reference"``: no kernels: the formula of ``speechbrain_spg.gate``
  under autograd.

The layers gate through three functions: ``gate_matrices`` (with autograd),
``gated_values`` (inference) and ``soft_zero_counts`` (matrices a pass did
not gate); ``chunks`` decides how many matrices one call gates. Every backend is tested against the reference
(``tests/test_kernels.py``).

Authors
 * speechbrain-spg developers 2026
"""

import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from speechbrain_spg.gate import gated_weight, soft_zero_count
from speechbrain_spg.kernels import eager

GATE_IMPLS = ("fused", "compiled", "reference")


@dataclass(frozen=True)
class GateKernels:
    """One backend of the gate: functions over lists of matrices.

    Arguments
    ---------
    name : str
        ``"eager"``, ``"compiled"`` or ``"triton"``.
    forward : callable
        ``(Ws, ts, taus, dtype=None) -> (gated Ws, soft-zero counts)``.
    backward : callable
        ``(Ws, ts, taus, grads, grad_zeros) -> grad_ts``; ``grads`` become
        the weight gradients.
    backward_upcast : callable
        ``(Ws, ts, taus, grads, grad_zeros) -> (grad_Ws, grad_ts)`` for
        ``grads`` in a lower precision than ``Ws``.
    backward_from_gated : callable
        ``(Ws, gated Ws, ts, taus, grads, grad_zeros) -> grad_ts``, as
        ``backward`` but reading the masks back from the gated weights.
    soft_zeros : callable
        ``(Ws, ts, taus) -> (counts, sums of M (1 - M) / tau)``.

    ``ts`` and ``taus`` are 1-D (one entry per matrix); so are the counts
    and ``grad_ts``. ``kernels.eager`` holds the plain PyTorch versions.

    Example
    -------
    >>> EAGER.name
    'eager'
    """

    name: str
    forward: object
    backward: object
    backward_upcast: object
    backward_from_gated: object
    soft_zeros: object


#: The default backend: ``kernels.eager``, plain PyTorch operations.
EAGER = GateKernels(
    "eager",
    eager.forward,
    eager.backward,
    eager.backward_upcast,
    eager.backward_from_gated,
    eager.soft_zeros,
)


def with_fallback(fast, fallback, state, warning, fatal=()):
    """``fast``, or ``fallback`` from the first failure on: a compiler or
    Triton problem must not stop a training run.

    Arguments
    ---------
    fast, fallback : callable
        The function to try, and the one to use once it failed.
    state : dict
        Its ``"failed"`` entry, shared by the functions that fail together.
    warning : str
        Shown once, at the failure; ``{error}`` becomes the error.
    fatal : tuple of type
        Errors that are raised, not fallen back from (the failure is still
        recorded).

    Returns
    -------
    callable

    Example
    -------
    >>> def broken(x):
    ...     raise RuntimeError("no compiler")
    >>> run = with_fallback(broken, lambda x: x + 1, {"failed": False},
    ...                     "broken failed ({error})")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     run(1), run(2), [str(w.message) for w in caught]
    (2, 3, ['broken failed (RuntimeError: no compiler)'])
    """

    def run(*args):
        if not state["failed"]:
            try:
                return fast(*args)
            except fatal:
                state["failed"] = True
                raise
            except Exception as error:  # noqa: BLE001 - any such problem
                state["failed"] = True
                error = f"{type(error).__name__}: {error}"
                warnings.warn(warning.format(error=error), stacklevel=2)
        return fallback(*args)

    return run


def check_gate_impl(gate_impl):
    """Refuses an unknown ``gate_impl`` with the allowed values.

    Arguments
    ---------
    gate_impl : str
        The requested backend.

    Returns
    -------
    str
        ``gate_impl``.

    Example
    -------
    >>> check_gate_impl("fast")
    Traceback (most recent call last):
      ...
    ValueError: gate_impl: must be one of 'fused', 'compiled', 'reference', got 'fast'.
    """
    if gate_impl not in GATE_IMPLS:
        names = ", ".join(repr(name) for name in GATE_IMPLS)
        raise ValueError(
            f"gate_impl: must be one of {names}, got {gate_impl!r}."
        )
    return gate_impl


def select_kernels(weights, gate_impl):
    """The backend that gates ``weights`` for ``gate_impl``.

    Arguments
    ---------
    weights : list of torch.Tensor
        The matrices of one call (their device and dtype decide).
    gate_impl : str
        ``"fused"`` or ``"compiled"`` (``"reference"`` has no kernels).

    Returns
    -------
    GateKernels

    Example
    -------
    >>> select_kernels([torch.zeros(2, 2)], "fused").name
    'eager'
    >>> select_kernels([torch.zeros(2, 2)], "compiled").name  # a CPU tensor
    'compiled'
    """
    if check_gate_impl(gate_impl) == "fused":
        return EAGER
    if gate_impl == "reference":
        raise ValueError("gate_impl 'reference' runs no kernels.")
    from speechbrain_spg.kernels import compiled, triton

    fallback = compiled.compiled_kernels(weights[0].device.type)
    if triton.supports(weights):
        return triton.triton_kernels(fallback)
    return fallback


def autocast_dtype(weight):
    """The dtype a matrix product under autocast would cast ``weight`` to.

    Arguments
    ---------
    weight : torch.Tensor
        A weight matrix.

    Returns
    -------
    torch.dtype or None
        Autocast's dtype on ``weight``'s device type when it is on there
        and ``weight`` is float32; None otherwise (no cast).

    Example
    -------
    >>> autocast_dtype(torch.zeros(2)) is None
    True
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     autocast_dtype(torch.zeros(2))
    torch.bfloat16
    """
    device_type = weight.device.type
    if weight.dtype != torch.float32 or not torch.is_autocast_enabled(
        device_type
    ):
        return None
    return torch.get_autocast_dtype(device_type)


def default_recompute_mask(weight):
    """Whether the backward computes a weight's mask again (True) or reads
    it back from the gated weight (False).

    Arguments
    ---------
    weight : torch.Tensor
        The weight matrix about to be gated.

    Returns
    -------
    bool
        False for float32 / float64 weights on a CPU without autocast: the
        matrix product keeps the gated weight anyway, and a division costs
        less than a sigmoid there. True otherwise: on a GPU memory traffic
        is the cost, under autocast the product keeps a low-precision copy,
        not the gated weight, and in 16 bits the quotient is too coarse.

    Example
    -------
    >>> default_recompute_mask(torch.zeros(2))
    False
    >>> default_recompute_mask(torch.zeros(2, dtype=torch.bfloat16))
    True
    """
    return (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.float64)
        or torch.is_autocast_enabled(weight.device.type)
    )


def _can_overwrite(grad, weight):
    """Whether ``grad`` has the layout the in-place backward writes into
    (the caller vouches that nothing else reads it)."""
    return (
        not torch.is_grad_enabled()
        and not grad.requires_grad
        and grad.is_contiguous()
        and grad.dtype == weight.dtype
        and grad.shape == weight.shape
    )


class GateFunction(torch.autograd.Function):
    """``(soft-zero counts, W_1 * M_1, ..., W_n * M_n)`` in one call of a
    backend, and the gradients of all in one call.

    The counts are differentiable in the thresholds only. A gated weight
    that gets no gradient (a block skipped by LayerDrop) gives its weight no
    gradient, as on the reference path.

    Example
    -------
    >>> w = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ...      for _ in range(2)]
    >>> t = torch.tensor([0.4, 0.7], dtype=torch.float64, requires_grad=True)
    >>> tau = torch.tensor([0.05, 0.1], dtype=torch.float64)
    >>> def run(t, *w):
    ...     return GateFunction.apply(t, tau, EAGER, None, None, False, *w)
    >>> torch.autograd.gradcheck(lambda t, *w: run(t, *w)[1:], (t, *w))
    True
    >>> plain = [x.detach() for x in w]
    >>> torch.autograd.gradcheck(lambda t: run(t, *plain)[0], (t,))
    True
    """

    @staticmethod
    def forward(
        ctx,
        thresholds,
        taus,
        kernels,
        recompute_mask,
        out_dtype,
        overwrite_grad,
        *weights,
    ):
        """Gated weights and soft-zero counts.

        Arguments
        ---------
        ctx : context
            Autograd context.
        thresholds, taus : torch.Tensor
            Absolute threshold and temperature of each matrix (1-D).
        kernels : GateKernels
            The backend.
        recompute_mask : bool, optional
            How the backward gets the masks (default:
            ``default_recompute_mask`` of the first matrix).
        out_dtype : torch.dtype, optional
            Return the gated weights in this dtype (autocast's): the
            backward then always computes the masks again.
        overwrite_grad : bool
            The backward may write the weight gradients into the gradients
            it receives: only for a caller that feeds each gated weight to
            one operation and nothing else.
        *weights : torch.Tensor
            The matrices.

        Returns
        -------
        tuple
            Soft-zero counts (1-D), then the gated weights.
        """
        weights = list(weights)
        if out_dtype == weights[0].dtype:
            out_dtype = None
        if out_dtype is not None:
            recompute_mask = True
        elif recompute_mask is None:
            recompute_mask = default_recompute_mask(weights[0])
        if out_dtype is None:
            gated, zeros = kernels.forward(weights, thresholds, taus)
        else:
            gated, zeros = kernels.forward(weights, thresholds, taus, out_dtype)
        # Unused outputs give None gradients, not zeros: their weights then
        # get no gradient.
        ctx.set_materialize_grads(False)
        ctx.kernels, ctx.recompute_mask = kernels, recompute_mask
        ctx.overwrite_grad, ctx.count = overwrite_grad, len(weights)
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
            Gradient of the thresholds, None for the options, then one
            weight gradient per matrix.
        """
        thresholds, taus, *saved = ctx.saved_tensors
        weights, gated = saved[: ctx.count], saved[ctx.count :]
        if grad_zeros is None:
            grad_zeros = torch.zeros_like(thresholds)
        upcast = ctx.recompute_mask and ctx.gated_dtype != weights[0].dtype
        grads = []
        for weight, grad in zip(weights, grad_gated):
            if grad is None:
                grad = torch.zeros_like(weight, dtype=ctx.gated_dtype)
            elif not upcast and not (
                ctx.overwrite_grad and _can_overwrite(grad, weight)
            ):
                grad = grad.to(weight.dtype, copy=True).contiguous()
            grads.append(grad)
        args = (thresholds, taus, grads, grad_zeros)
        if upcast:
            grads, grad_thresholds = ctx.kernels.backward_upcast(weights, *args)
        elif ctx.recompute_mask:
            grad_thresholds = ctx.kernels.backward(weights, *args)
        else:
            grad_thresholds = ctx.kernels.backward_from_gated(
                weights, gated, *args
            )
        grad_weights = [
            grad if used is not None and ctx.needs_input_grad[6 + i] else None
            for i, (grad, used) in enumerate(zip(grads, grad_gated))
        ]
        grad_thresholds = grad_thresholds.to(thresholds.dtype)
        return (grad_thresholds, *[None] * 5, *grad_weights)


class SoftZerosFunction(torch.autograd.Function):
    """Soft-zero counts of matrices a pass did not gate, differentiable in
    the thresholds; the forward also sums the slopes, so the backward
    touches no weight.

    Example
    -------
    >>> w = [torch.tensor([0.0, 0.1, 3.0], dtype=torch.float64)]
    >>> t = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    >>> tau = torch.tensor([0.05], dtype=torch.float64)
    >>> torch.autograd.gradcheck(
    ...     lambda t: SoftZerosFunction.apply(t, tau, EAGER, *w), (t,))
    True
    """

    @staticmethod
    def forward(ctx, thresholds, taus, kernels, *weights):
        """The counts.

        Arguments
        ---------
        ctx : context
            Autograd context.
        thresholds, taus : torch.Tensor
            1-D, one entry per matrix.
        kernels : GateKernels
            The backend.
        *weights : torch.Tensor
            The matrices (not differentiated).

        Returns
        -------
        torch.Tensor
            ``sum(1 - M)`` of every matrix (1-D).
        """
        counts, slopes = kernels.soft_zeros(list(weights), thresholds, taus)
        ctx.save_for_backward(thresholds, slopes)
        return counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_counts):
        """Gradient of the thresholds only.

        Arguments
        ---------
        ctx : context
            Autograd context.
        grad_counts : torch.Tensor
            Gradient of the counts (1-D).

        Returns
        -------
        tuple
            Gradient of the thresholds, then None for the rest.
        """
        thresholds, slopes = ctx.saved_tensors
        grad = grad_counts * slopes * thresholds
        return (
            grad.to(thresholds.dtype),
            None,
            None,
            *[None] * (len(ctx.needs_input_grad) - 3),
        )


def gate_matrices(
    weights,
    thresholds,
    taus,
    gate_impl,
    recompute_mask=None,
    out_dtype=None,
    overwrite_grad=False,
):
    """Gates matrices with autograd: their soft-zero counts and ``W * M``.

    Arguments
    ---------
    weights : list of torch.Tensor
        The matrices.
    thresholds, taus : torch.Tensor
        Absolute threshold and temperature of each matrix (1-D).
    gate_impl : str
        ``"fused"``, ``"compiled"`` or ``"reference"`` (``select_kernels``).
    recompute_mask : bool, optional
        See ``GateFunction`` (fused backends only).
    out_dtype : torch.dtype, optional
        Return the gated weights in this dtype.
    overwrite_grad : bool
        See ``GateFunction`` (fused backends only).

    Returns
    -------
    zeros : torch.Tensor
        ``sum(1 - M)`` of every matrix (1-D), differentiable in the
        thresholds.
    gated : list of torch.Tensor
        ``W * M`` of every matrix.

    Example
    -------
    >>> w, t, tau = [torch.tensor([0.1, 2.0])], torch.tensor([0.5]), torch.tensor([0.05])
    >>> zeros, gated = gate_matrices(w, t, tau, "fused")
    >>> gated[0], zeros
    (tensor([0.0083, 2.0000]), tensor([0.9168]))
    >>> torch.equal(gate_matrices(w, t, tau, "reference")[1][0], gated[0])
    True
    """
    if gate_impl == "reference":
        gated = [
            gated_weight(w, thresholds[i], taus[i])
            for i, w in enumerate(weights)
        ]
        if out_dtype is not None:
            gated = [g.to(out_dtype) for g in gated]
        return soft_zero_counts(weights, thresholds, taus, gate_impl), gated
    kernels = select_kernels(weights, gate_impl)
    options = (recompute_mask, out_dtype, overwrite_grad)
    zeros, *gated = GateFunction.apply(
        thresholds, taus, kernels, *options, *weights
    )
    return zeros, gated


def gated_values(weights, thresholds, taus, gate_impl, out_dtype=None):
    """``W * M`` of matrices without autograd (evaluation, recomputation).

    Arguments
    ---------
    weights, thresholds, taus, gate_impl, out_dtype
        As in ``gate_matrices``.

    Returns
    -------
    list of torch.Tensor

    Example
    -------
    >>> gated_values([torch.tensor([0.1, 2.0])], torch.tensor([0.5]),
    ...              torch.tensor([0.05]), "fused")
    [tensor([0.0083, 2.0000])]
    """
    with torch.no_grad():
        if gate_impl == "reference":
            gated = [
                gated_weight(w, thresholds[i], taus[i])
                for i, w in enumerate(weights)
            ]
            return [g if out_dtype is None else g.to(out_dtype) for g in gated]
        kernels = select_kernels(weights, gate_impl)
        if out_dtype is None or out_dtype == weights[0].dtype:
            return kernels.forward(weights, thresholds, taus)[0]
        return kernels.forward(weights, thresholds, taus, out_dtype)[0]


def soft_zero_counts(weights, thresholds, taus, gate_impl):
    """``sum(1 - M)`` of matrices, differentiable in the thresholds only.

    Arguments
    ---------
    weights, thresholds, taus, gate_impl
        As in ``gate_matrices``.

    Returns
    -------
    torch.Tensor
        1-D, one count per matrix.

    Example
    -------
    >>> t = torch.tensor([1.0], requires_grad=True)
    >>> counts = soft_zero_counts([torch.tensor([0.0, 3.0])], t,
    ...                           torch.tensor([0.05]), "fused")
    >>> counts.detach().round(decimals=3), counts.grad_fn.name()
    (tensor([1.]), 'SoftZerosFunctionBackward')
    """
    if gate_impl == "reference":
        return torch.stack(
            [
                soft_zero_count(w, thresholds[i], taus[i])
                for i, w in enumerate(weights)
            ]
        )
    kernels = select_kernels(weights, gate_impl)
    return SoftZerosFunction.apply(thresholds, taus, kernels, *weights)
