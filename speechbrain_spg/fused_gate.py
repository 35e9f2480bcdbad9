"""Fast path of the self-pinching gate: one fused pass forward, one backward.

The reference implementation (``gates.PinchFunction`` for the gated weight,
plus ``gates.SoftZerosFunction`` for the sparsity regulariser) reads the
gated weights about a dozen times per training step, and the soft-sparsity
term recomputes the mask in a separate pass. ``FusedPinchFunction`` computes
the gated weight AND the expected number of pinched weights from the same
mask in one forward pass, and produces the gradients of both outputs
(weights and threshold) in one backward pass. Where the caller knows the
gated weight feeds one matrix product and nothing else (``GatedLinear``),
``overwrite_grad=True`` lets the backward write the weight gradient into the
buffer autograd hands it (no new weight-sized tensor). The backward passes
are not themselves differentiable (no double backward; the reference path
is).

What the backward starts from depends on the device:

- GPUs, autocast, float16 / bfloat16 weights (``recompute_mask=True``):
  only ``W`` and ``t`` are saved and the mask is recomputed; on a GPU the
  arithmetic is nearly free and memory traffic is the cost, under
  autocast the matrix product keeps a low-precision copy of ``W * M``,
  not ``W * M`` itself, and a 16-bit quotient would be too coarse.
- float32 / float64 weights on CPU without autocast
  (``recompute_mask=False``): the backward reads the mask back from the
  gated weight the forward pass returned, ``M = (W * M) / W`` (where
  ``W * M`` underflows, ``M`` is the mask at ``W = 0``: the two agree to
  float32 precision there). The gated weight is kept for the matrix
  product's backward anyway (when the product's input needs a gradient;
  ``GatedLinear`` recomputes otherwise), so this costs no memory, and a
  division is much cheaper than the sigmoid on a CPU (see
  ``benchmarks/RESULTS.md``).

Under autocast, ``GatedLinear`` asks for ``W * M`` in the autocast dtype
(``out_dtype``): the forward kernel casts it, so the matrix product has no
float32 copy to cast in a pass of its own, and the backward kernel reads the
low-precision gradient and writes the float32 weight gradient in one pass.
The numbers are those of casting a float32 ``W * M``.

The sigmoid's argument is clipped at ``SIGMOID_SATURATION`` (see there):
no value changes, but a CPU no longer computes subnormal numbers for the
weights far above their threshold. For the same reason no gated weight is
returned subnormal (``flush_subnormal``; the Triton kernels on CUDA keep
them, GPUs are not slowed down by them).

Where ``torch.compile`` works (a C++ compiler on CPU, Triton on CUDA) the
element-wise math is compiled into single kernels; otherwise the same math
runs as eager PyTorch operations. On x86-64 CPUs with AVX2, float32 weights
go to hand-written C kernels instead (``native_gate``: one pass per kernel,
about half the time per weight; ``native_cpu_kernels``). All give the
reference numbers within float32 rounding.

Authors
 * speechbrain-spg developers 2026
"""

import functools
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from speechbrain_spg import native_gate
from speechbrain_spg.reused_memory import alias

#: Upper clip of the sigmoid's argument in the fused kernels. Above it the
#: sigmoid is exactly 1 in every floating dtype (from 8.3 in float16, 16.6
#: in float32, 36.7 in float64), so clipping changes no value. Without it,
#: the sigmoid's ``exp(-x)`` is a subnormal number for ``87.3 < x < 103.9``
#: in float32 (about 2% of the weights of a freshly initialised model: those
#: about twice the weight std, with the default temperature), which x86 CPUs
#: compute through a slow microcode path unless denormals are flushed: the
#: compiled forward kernel took 1.38 ns per weight instead of 0.95 on real
#: weights (``benchmarks/RESULTS.md``). An int: ``torch.compile`` takes a
#: module-level int as a constant, but traces a float as a 0-d tensor that
#: every call of the compiled kernel reads back with ``.item()``.
SIGMOID_SATURATION = 80


def _pinch_argument(weight, threshold, tau):
    """``(W^2 - t^2) / (2 tau)``, clipped above at ``SIGMOID_SATURATION``.

    Example
    -------
    >>> _pinch_argument(torch.tensor([0.0, 1.0, 10.0]), torch.tensor(0.5),
    ...                 torch.tensor(0.125))
    tensor([-1.,  3., 80.])
    """
    x = (weight * weight - threshold * threshold) / (2 * tau)
    return x.clamp(max=SIGMOID_SATURATION)


def _mask(weight, threshold, tau):
    """The soft mask ``sigmoid((W^2 - t^2) / (2 tau))``."""
    return torch.sigmoid(_pinch_argument(weight, threshold, tau))


def _row_sums(x):
    """Sums over the last dimension on CUDA, the whole sum elsewhere.

    The kernels return these partial sums and the caller adds them up. On
    CUDA a reduction of a whole matrix to one number, fused with an
    element-wise output, compiles into a kernel that one thread block runs
    alone (28 ms per HuBERT-large matrix on an H100), while rows reduce in
    parallel. On CPU the whole sum compiles into a faster kernel that
    needs no per-row buffer (see ``benchmarks/RESULTS.md``).
    """
    return x.sum(dim=-1) if x.is_cuda else x.sum()


def flush_subnormal(x):
    """``x`` with its subnormal values set to zero.

    A gated weight ``W * M`` of a pinched weight can be subnormal (``M``
    tiny and ``W`` small); the matrix products of the forward and backward
    passes then take a slow microcode path on x86 CPUs for every vector
    that holds one. 0.4% subnormal gated weights made the training step of
    a trained tiny lobe 1.6x slower (1023 against 639 ms,
    ``benchmarks/subnormal_cost.py``; ``benchmarks/RESULTS.md``). Zero
    differs from such a value by less than the dtype's smallest normal
    number (1.2e-38 in float32), and the backward reads these weights'
    mask as the mask at ``W = 0``, as it did for underflowing products.

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


def _forward_math(weight, threshold, tau, dtype=None):
    """Gated weight (cast to ``dtype`` if given; no subnormal value, see
    ``flush_subnormal``) and the row sums of the mask, from one mask
    computation."""
    mask = _mask(weight, threshold, tau)
    gated = flush_subnormal(weight * mask)
    if dtype is not None:
        gated = gated.to(dtype)
    return gated, _row_sums(mask)


def _soft_zeros_math(weight, threshold, tau):
    """Row sums of ``M`` and of ``M (1 - M) / tau`` (its threshold slope)."""
    mask = _mask(weight, threshold, tau)
    return _row_sums(mask), _row_sums(mask * (1 - mask) / tau)


def _chain_rule(weight, mask, threshold, tau, grad, grad_zeros):
    """``d(W M)/dW`` and the row sums of the threshold gradient, from a mask.

    With ``slope = dM/d(W^2) * 2 = M (1 - M) / tau``:
    ``d(W M)/dW = M + W^2 slope``, ``d(W M)/dt = -t W slope`` and
    ``d sum(1 - M)/dt = t sum(slope)``.
    """
    slope = mask * (1 - mask) / tau
    grad_threshold = threshold * _row_sums(slope * (grad_zeros - grad * weight))
    return mask + weight * weight * slope, grad_threshold


def _gradients_inplace(weight, mask, threshold, tau, grad_out, grad_zeros):
    """Backward from a mask: threshold gradient returned, the weight
    gradient written into ``grad_out``."""
    factor, grad_threshold = _chain_rule(
        weight, mask, threshold, tau, grad_out, grad_zeros
    )
    grad_out.mul_(factor)
    return grad_threshold


def _backward_math_inplace(weight, threshold, tau, grad_out, grad_zeros):
    """Backward that recomputes the mask."""
    mask = _mask(weight, threshold, tau)
    return _gradients_inplace(
        weight, mask, threshold, tau, grad_out, grad_zeros
    )


def _backward_upcast_math(weight, threshold, tau, grad, grad_zeros):
    """Backward that recomputes the mask, for a gradient in a lower
    precision than ``W`` (the gate returned ``W * M`` in the autocast
    dtype): reads it once and returns the weight gradient in ``W``'s dtype,
    with the threshold gradient."""
    mask = _mask(weight, threshold, tau)
    grad = grad.to(weight.dtype)
    factor, grad_threshold = _chain_rule(
        weight, mask, threshold, tau, grad, grad_zeros
    )
    return grad * factor, grad_threshold


def _backward_from_gated_math_inplace(
    weight, gated, threshold, tau, grad_out, grad_zeros
):
    """Backward that reads the mask back from ``gated = W * M``.

    Where ``|W * M|`` is below the smallest normal number of its dtype
    (``W`` zero or tiny, or ``M`` negligible), the quotient loses its
    precision; there ``M`` is taken as the mask at ``W = 0``, which equals
    ``M`` to float32 precision when ``W`` is tiny, and both are negligible
    otherwise.
    """
    at_zero = torch.sigmoid(-threshold * threshold / (2 * tau))
    tiny = torch.finfo(gated.dtype).tiny
    mask = torch.where(gated.abs() >= tiny, gated / weight, at_zero)
    return _gradients_inplace(
        weight, mask, threshold, tau, grad_out, grad_zeros
    )


@dataclass(frozen=True)
class GateKernels:
    """The element-wise math of the fused gate, compiled or eager.

    Arguments
    ---------
    forward : callable
        ``(W, t, tau, dtype=None) -> (W * M, sums of M)``, ``W * M`` cast
        to ``dtype`` if given.
    backward : callable
        ``(W, t, tau, grad, grad_zeros) -> sums of grad_t``; ``grad``
        becomes the weight gradient.
    backward_upcast : callable
        ``(W, t, tau, grad, grad_zeros) -> (grad_W, sums of grad_t)`` for a
        lower-precision ``grad``; ``grad_W`` in ``W``'s dtype.
    backward_from_gated : callable
        ``(W, W * M, t, tau, grad, grad_zeros) -> sums of grad_t``, same
        contract.
    soft_zeros : callable
        ``(W, t, tau) -> (sums of M, sums of M (1 - M) / tau)``.
    compiled : bool
        Whether ``torch.compile`` produced these kernels.

    Every sum is returned as partial sums (per row on CUDA); the caller
    adds them up (see ``_row_sums``).

    Example
    -------
    >>> kernels = GateKernels(
    ...     _forward_math, _backward_math_inplace, _backward_upcast_math,
    ...     _backward_from_gated_math_inplace, _soft_zeros_math,
    ...     compiled=False,
    ... )
    >>> kernels.compiled
    False
    """

    forward: object
    backward: object
    backward_upcast: object
    backward_from_gated: object
    soft_zeros: object
    compiled: bool


EAGER_KERNELS = GateKernels(
    _forward_math,
    _backward_math_inplace,
    _backward_upcast_math,
    _backward_from_gated_math_inplace,
    _soft_zeros_math,
    compiled=False,
)


def _with_eager_fallback(compiled, eager):
    """``compiled``, falling back to ``eager`` (with a warning) if it fails.

    The probe of ``compiled_kernels`` compiles for float32 only; another
    dtype compiles on first use, and a compiler problem then must not stop
    a training run.
    """
    state = {"failed": False}

    def run(*args):
        if not state["failed"]:
            try:
                # Plain views: Dynamo gives parameters static shapes, which
                # would compile the kernel once per weight shape.
                return compiled(*(_plain(arg) for arg in args))
            except Exception as error:  # noqa: BLE001 - any compiler problem
                state["failed"] = True
                warnings.warn(
                    "torch.compile failed on the SPG gate kernel "
                    f"{eager.__name__} ({type(error).__name__}: {error}); "
                    "using the eager kernel from now on.",
                    stacklevel=2,
                )
        return eager(*args)

    return run


def _plain(arg):
    """A tensor (or each of a list of tensors) as a plain view, with no
    autograd identity; anything else (a dtype) unchanged."""
    if isinstance(arg, (list, tuple)):
        return [_plain(item) for item in arg]
    return arg.detach() if isinstance(arg, torch.Tensor) else arg


@functools.cache
def compiled_kernels(device_type):
    """Compiled gate kernels for a device type, or the eager ones.

    Arguments
    ---------
    device_type : str
        ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    GateKernels
        ``compiled`` says whether ``torch.compile`` succeeded on a probe;
        if it did not (no C++ compiler, no Triton), the eager kernels.

    Example
    -------
    >>> kernels = compiled_kernels("cpu")
    >>> out, mask_sums = kernels.forward(
    ...     torch.ones(2, 3), torch.tensor(0.0), torch.tensor(1.0)
    ... )
    >>> round(float(mask_sums.sum()), 4)  # 6 * sigmoid(1 / 2)
    3.7348
    """
    eager = (
        EAGER_KERNELS.forward,
        EAGER_KERNELS.backward,
        EAGER_KERNELS.backward_upcast,
        EAGER_KERNELS.backward_from_gated,
        EAGER_KERNELS.soft_zeros,
    )
    try:
        compiled = [
            torch.compile(f, dynamic=True, fullgraph=True) for f in eager
        ]
        forward, backward, upcast, from_gated, soft_zeros = compiled
        # Called as training calls them (a non-square matrix, distinct
        # scalars, inside autograd where grad mode is off), so that training
        # reuses these kernels for every weight shape instead of compiling
        # them again.
        weight = torch.ones(4, 6, device=device_type)
        threshold = torch.tensor(0.5, device=device_type)
        tau = torch.tensor(0.25, device=device_type)
        grad_zeros = torch.tensor(1.0, device=device_type)
        with torch.no_grad():
            gated, _ = forward(weight, threshold, tau)
            # bfloat16: the autocast dtype of GPU training.
            forward(weight, threshold, tau, torch.bfloat16)
            upcast(weight, threshold, tau, gated.bfloat16(), grad_zeros)
            grad = torch.ones_like(weight)
            backward(weight, threshold, tau, grad, grad_zeros)
            from_gated(weight, gated, threshold, tau, grad, grad_zeros)
            soft_zeros(weight, threshold, tau)
        return GateKernels(
            *(map(_with_eager_fallback, compiled, eager)), compiled=True
        )
    except Exception:  # noqa: BLE001 - any compiler problem: stay eager
        return EAGER_KERNELS


def default_recompute_mask(weight):
    """Whether the fused gate's backward recomputes the mask of a weight.

    Arguments
    ---------
    weight : torch.Tensor
        The weight matrix about to be gated.

    Returns
    -------
    bool
        False for a float32 / float64 weight on CPU without autocast: the
        backward divides the gated weight, which the matrix product keeps
        anyway, by ``W`` (exponentials are the cost there). True otherwise:
        on a GPU recomputing reads less memory than the division; under
        autocast the matrix product keeps a low-precision copy of the gated
        weight, not the gated weight, so keeping it would cost memory; and
        in float16 / bfloat16 the quotient is too coarse (and float16's
        smallest normal number, 6e-5, is the size of typical weights).

    Example
    -------
    >>> default_recompute_mask(torch.zeros(2))
    False
    >>> default_recompute_mask(torch.zeros(2, dtype=torch.bfloat16))
    True
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     default_recompute_mask(torch.zeros(2))
    True
    """
    return (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.float64)
        or torch.is_autocast_enabled(weight.device.type)
    )


def autocast_dtype(weight):
    """The dtype a matrix product under autocast would cast ``weight`` to.

    Arguments
    ---------
    weight : torch.Tensor
        A weight matrix.

    Returns
    -------
    torch.dtype or None
        The autocast dtype of ``weight``'s device type when autocast is on
        there and ``weight`` is float32; None otherwise (no cast).

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


def _resolve_policy(weight, out_dtype, recompute_mask):
    """``(out_dtype, recompute_mask)`` for gating ``weight``: no cast to
    its own dtype; a cast always recomputes the mask in the backward;
    otherwise the given policy, or ``default_recompute_mask``."""
    if out_dtype == weight.dtype:
        out_dtype = None
    if out_dtype is not None:
        return out_dtype, True
    if recompute_mask is None:
        return None, default_recompute_mask(weight)
    return None, recompute_mask


def _run_forward(kernels, weight, threshold, tau, out_dtype):
    """``kernels.forward``, given a dtype only to cast (the probe compiled
    the call without one)."""
    if out_dtype is None:
        return kernels.forward(weight, threshold, tau)
    return kernels.forward(weight, threshold, tau, out_dtype)


def _run_backward(
    kernels,
    upcast,
    recompute_mask,
    weight,
    gated,
    threshold,
    tau,
    grad,
    grad_zeros,
):
    """The backward kernel the policy picks: ``(weight gradient, threshold
    gradient sums)``. Works for one matrix (``GateKernels``) and for lists
    (``batched_gate.BatchKernels``); ``grad`` is overwritten except when
    up-casting."""
    if upcast:
        # One pass reads the low-precision gradient and writes the weight
        # gradient in W's dtype (no separate up-cast).
        return kernels.backward_upcast(weight, threshold, tau, grad, grad_zeros)
    if recompute_mask:
        return grad, kernels.backward(weight, threshold, tau, grad, grad_zeros)
    return grad, kernels.backward_from_gated(
        weight, gated, threshold, tau, grad, grad_zeros
    )


def _native_first(name):
    """Gate kernel ``name`` of ``native_gate`` for the calls it takes
    (``native_gate.supports``), the ``torch.compile`` one for the rest."""

    def run(*args):
        native = getattr(native_gate, name, None)
        if native is not None and native_gate.supports(args):
            return native(*args)
        return getattr(compiled_kernels("cpu"), name)(*args)

    run.__name__ = name
    return run


@functools.cache
def native_cpu_kernels():
    """The CPU gate kernels: hand-written C (``native_gate``) for
    contiguous float32 tensors, ``compiled_kernels("cpu")`` for the rest.

    The ``torch.compile`` kernels are compiled only when first needed
    (float64 weights, autocast casts).

    Returns
    -------
    GateKernels

    Example
    -------
    >>> kernels = native_cpu_kernels()
    >>> gated, mask_sum = kernels.forward(
    ...     torch.ones(2, 3), torch.tensor(0.0), torch.tensor(1.0)
    ... )
    >>> round(float(mask_sum), 4)  # 6 * sigmoid(1 / 2)
    3.7348
    """
    return GateKernels(
        _native_first("forward"),
        _native_first("backward"),
        _native_first("backward_upcast"),  # always compiled: it casts
        _native_first("backward_from_gated"),
        _native_first("soft_zeros"),
        compiled=True,
    )


def _kernels_for(weight, compiled):
    """The fast kernels of ``weight``'s device (``native_cpu_kernels`` on a
    CPU that runs them, unless ``torch.compile`` is tracing the caller;
    else ``compiled_kernels``), or the eager ones."""
    if not compiled:
        return EAGER_KERNELS
    if (
        weight.device.type == "cpu"
        # Under a torch.compile of the whole model, kernels it can trace.
        and not torch.compiler.is_compiling()
        and native_gate.available()
    ):
        return native_cpu_kernels()
    return compiled_kernels(weight.device.type)


def gated_value(weight, threshold, tau, compiled=False, out_dtype=None):
    """``W * M`` from the forward kernel of ``FusedPinchFunction``, outside
    autograd (no soft-zero count, nothing saved).

    Arguments
    ---------
    weight : torch.Tensor
        The weight matrix.
    threshold : torch.Tensor
        Scalar threshold ``t``.
    tau : torch.Tensor
        Scalar temperature.
    compiled : bool
        Use the ``torch.compile`` kernels when they are available.
    out_dtype : torch.dtype, optional
        Cast ``W * M`` to this dtype in the same kernel.

    Returns
    -------
    torch.Tensor
        ``W * M``, no gradient.

    Example
    -------
    >>> w, t, tau = torch.tensor([0.1, 2.0]), torch.tensor(0.5), torch.tensor(0.05)
    >>> gated_value(w, t, tau)
    tensor([0.0083, 2.0000])
    """
    out_dtype, _ = _resolve_policy(weight, out_dtype, None)
    with torch.no_grad():
        kernels = _kernels_for(weight, compiled)
        return _run_forward(kernels, weight, threshold, tau, out_dtype)[0]


def _can_overwrite(grad, weight):
    """Whether ``grad`` has the layout the in-place backward writes into.

    The caller vouches that no one else reads the buffer
    (``overwrite_grad``); this checks what it cannot: no graph of the
    backward is being built, and dtype, shape and memory layout match.
    """
    return (
        not torch.is_grad_enabled()
        and not grad.requires_grad
        and grad.is_contiguous()
        and grad.dtype == weight.dtype
        and grad.shape == weight.shape
    )


def _writes_into_memory(kernels, weight, threshold, tau, out_dtype):
    """Whether the forward can write ``W * M`` into kept memory: the C
    kernels run it (no cast)."""
    return (
        out_dtype is None
        and kernels is native_cpu_kernels()
        and native_gate.supports((weight, threshold, tau))
    )


def _weight_gradient_memory(ctx, weight, grad_gated):
    """Where the backward of a forward that wrote into kept memory writes
    the weight gradient: the memory of ``W * M`` itself once nothing but
    this backward holds it (the matrix product is done with it, no retained
    graph or user holds it), or, when the mask is recomputed, the kept
    memory if it is free; None otherwise (the usual buffers then)."""
    if ctx.memory is None or grad_gated is None:
        return None
    if not (
        type(grad_gated) is torch.Tensor  # noqa: E721 - no subclass
        and grad_gated.device == weight.device
        and grad_gated.dtype == weight.dtype
        and grad_gated.shape == weight.shape
    ):
        return None  # (any layout: see _backward_into)
    if ctx.gated_alias is not None:
        return ctx.gated_alias if ctx.memory.only_held_by(1) else None
    return ctx.memory.take_if_free(weight)


def _check_unchanged(ctx):
    """Raises autograd's error if ``W * M``, kept for the backward in
    memory of the gate's own, was changed in place since the forward (as
    far as its tensor still exists: nothing else can change it)."""
    gated = ctx.gated_ref()
    if gated is not None and gated._version != ctx.gated_version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been "
            "modified by an inplace operation: the gated weight W * M of "
            "FusedPinchFunction is at version "
            f"{gated._version}; expected version {ctx.gated_version} instead."
        )


def _backward_into(ctx, weight, gated, threshold, tau, grad, grad_zeros, out):
    """The C backward kernel of the policy, writing the weight gradient into
    ``out``; returns the threshold gradient. ``grad`` is read only (made
    contiguous first: a sum's gradient is an expanded scalar)."""
    grad = grad.contiguous()
    if ctx.recompute_mask:
        return native_gate.backward(
            weight, threshold, tau, grad, grad_zeros, out=out
        )
    return native_gate.backward_from_gated(
        weight, gated[0], threshold, tau, grad, grad_zeros, out=out
    )


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
    >>> for recompute in (False, True):
    ...     gated = lambda w, t: FusedPinchFunction.apply(
    ...         w, t, tau, False, recompute
    ...     )[0]
    ...     assert torch.autograd.gradcheck(gated, (w, t))
    >>> zeros = lambda t: FusedPinchFunction.apply(w.detach(), t, tau)[1]
    >>> torch.autograd.gradcheck(zeros, (t,))
    True
    """

    @staticmethod
    def forward(
        ctx,
        weight,
        threshold,
        tau,
        compiled=False,
        recompute_mask=None,
        overwrite_grad=False,
        out_dtype=None,
        memory=None,
    ):
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
        recompute_mask : bool, optional
            The backward recomputes the mask from ``W`` and ``t`` instead
            of dividing the kept ``W * M`` by ``W`` (default:
            ``default_recompute_mask(weight)``).
        overwrite_grad : bool
            The backward may write the weight gradient into the gradient
            of ``W * M`` it receives. Only for a caller that feeds ``W * M``
            to one operation and nothing else (the gradient buffer is then
            autograd's alone); never when user code can see that gradient
            (hooks, ``autograd.grad`` with given ``grad_outputs``).
        out_dtype : torch.dtype, optional
            Return ``W * M`` in this dtype, cast in the same kernel: for a
            caller whose matrix product runs under autocast (it would cast
            a float32 ``W * M`` in a separate pass). A lower precision than
            ``W``'s always recomputes the mask in the backward, which then
            reads the low-precision gradient directly.
        memory : reused_memory.ReusedMemory, optional
            Memory of this matrix kept from step to step, for the C
            kernels (float32 CPU weights, ``native_gate``; ignored
            elsewhere): ``W * M`` is written there, and the backward writes
            the weight gradient there once nothing else holds ``W * M``
            (see ``reused_memory``).

        Returns
        -------
        gated : torch.Tensor
            ``W * M``.
        soft_zeros : torch.Tensor
            Scalar ``sum(1 - M)``.
        """
        kernels = _kernels_for(weight, compiled)
        out_dtype, recompute_mask = _resolve_policy(
            weight, out_dtype, recompute_mask
        )
        ctx.kernels, ctx.recompute_mask = kernels, recompute_mask
        ctx.overwrite_grad = overwrite_grad
        ctx.memory = ctx.gated_alias = None
        if memory is not None and _writes_into_memory(
            kernels, weight, threshold, tau, out_dtype
        ):
            ctx.memory = memory
            gated = memory.take(weight)
            _, mask_rows = native_gate.forward(
                weight, threshold, tau, out=gated
            )
            if not recompute_mask:
                # Not saved with ``save_for_backward``: a tensor of our
                # own, so the backward can tell when no one else holds
                # the memory any more (see ``_weight_gradient_memory``).
                # Autograd's check that W * M was not changed in place
                # before the backward is then ours (``_check_unchanged``).
                ctx.gated_alias = alias(gated)
                ctx.gated_ref = weakref.ref(gated)
                ctx.gated_version = gated._version
        else:
            if memory is not None:
                # Kept for kernels this call does not run (the weights
                # moved to a GPU, autocast): no use holding it.
                memory.release()
            gated, mask_rows = _run_forward(
                kernels, weight, threshold, tau, out_dtype
            )
        if recompute_mask or ctx.gated_alias is not None:
            ctx.save_for_backward(weight, threshold, tau)
        else:
            ctx.save_for_backward(weight, threshold, tau, gated)
        return gated, weight.numel() - mask_rows.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gated, grad_zeros):
        """Gradients of weight and threshold in one pass.

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
        weight, threshold, tau, *gated = ctx.saved_tensors
        if ctx.gated_alias is not None:
            _check_unchanged(ctx)
            gated = [ctx.gated_alias]
        if grad_zeros is None:
            grad_zeros = torch.zeros(
                (), dtype=weight.dtype, device=weight.device
            )
        memory = _weight_gradient_memory(ctx, weight, grad_gated)
        if memory is not None:
            grad_threshold = _backward_into(
                ctx,
                weight,
                gated,
                threshold,
                tau,
                grad_gated,
                grad_zeros,
                memory,
            )
            if ctx.gated_alias is not None:
                # ``W * M`` is now the weight gradient: a second backward
                # of a retained graph recomputes the mask.
                ctx.gated_alias = None
                ctx.recompute_mask = True
            return (
                alias(memory)  # W's shape: autograd keeps it as W.grad
                if ctx.needs_input_grad[0]
                else None,
                grad_threshold.to(threshold.dtype),
                *[None] * 6,
            )
        upcast = (
            ctx.recompute_mask
            and grad_gated is not None
            and grad_gated.dtype != weight.dtype
        )
        if grad_gated is None:
            grad_gated = torch.zeros_like(weight)
        elif not upcast and not (
            ctx.overwrite_grad and _can_overwrite(grad_gated, weight)
        ):
            grad_gated = grad_gated.to(weight.dtype, copy=True).contiguous()
        grad_gated, grad_threshold = _run_backward(
            ctx.kernels,
            upcast,
            ctx.recompute_mask,
            weight,
            gated[0] if gated else None,
            threshold,
            tau,
            grad_gated,
            grad_zeros,
        )
        grad_weight = grad_gated if ctx.needs_input_grad[0] else None
        grad_threshold = grad_threshold.sum().to(threshold.dtype)
        return grad_weight, grad_threshold, *[None] * 6


class FusedSoftZerosFunction(torch.autograd.Function):
    """``sum(1 - M)`` of a matrix, differentiable in ``t``, in one pass.

    For matrices the forward pass did not gate (a block skipped by
    LayerDrop): the forward pass also sums the threshold slope, so the
    backward pass is a scalar product and touches no weight.

    Example
    -------
    >>> w = torch.tensor([0.0, 0.1, 3.0], dtype=torch.float64)
    >>> t = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    >>> tau = torch.tensor(0.05, dtype=torch.float64)
    >>> round(float(FusedSoftZerosFunction.apply(w, t, tau)), 3)
    2.0
    >>> torch.autograd.gradcheck(
    ...     lambda t: FusedSoftZerosFunction.apply(w, t, tau), (t,)
    ... )
    True
    """

    @staticmethod
    def forward(ctx, weight, threshold, tau, compiled=False):
        """Expected number of pinched weights.

        Arguments
        ---------
        ctx : context
            Autograd context.
        weight : torch.Tensor
            The weight matrix (not differentiated).
        threshold : torch.Tensor
            Scalar absolute threshold.
        tau : torch.Tensor
            Scalar temperature.
        compiled : bool
            Use the ``torch.compile`` kernel when it is available.

        Returns
        -------
        torch.Tensor
            Scalar ``sum(1 - M)``.
        """
        kernels = _kernels_for(weight, compiled)
        mask_rows, slope_rows = kernels.soft_zeros(weight, threshold, tau)
        ctx.save_for_backward(threshold, slope_rows.sum())
        return weight.numel() - mask_rows.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        """Gradient with respect to the threshold only.

        Arguments
        ---------
        ctx : context
            Autograd context.
        grad_output : torch.Tensor
            Scalar upstream gradient.

        Returns
        -------
        tuple
            ``None``, gradient of the threshold, ``None``, ``None``.
        """
        threshold, slope_sum = ctx.saved_tensors
        grad = grad_output * slope_sum * threshold
        return None, grad.to(threshold.dtype), None, None
