"""Gated matrices, six per hand-written Triton launch (CUDA).

On a GPU the gate's arithmetic is cheap and the host work around it is
not: ``torch.compile``-d kernels pay Dynamo's and Inductor's call wrappers
and one launch per matrix and kernel. Here one launch gates six matrices
(one transformer block) forward and one backward (``triton_kernels``), and
one small sum adds up the partial sums of all launches of a call. On one
GPU the lobes pass all their matrices in one call
(``chunks.matrices_per_call``).

The math is the eager backend's (clipped sigmoid, mask computed again in
the backward), so the numbers agree within float32 rounding; the
function ``triton_kernels`` implements the ``GateKernels`` interface for float32
CUDA weights when Triton is installed (``supports``). The tests run the
kernels with Triton's interpreter (``TRITON_INTERPRET=1``) on a CPU.

Authors
 * speechbrain-spg developers 2026
"""

import contextlib
import functools
import importlib
import importlib.util

import torch

from speechbrain_spg.gate import SIGMOID_SATURATION
from speechbrain_spg.kernels import GateKernels, with_fallback

#: At most this many programs per matrix and launch; each handles at least
#: ``ELEMENTS_PER_PROGRAM`` elements (HuBERT-large's FFN matrices: 512
#: programs of 8192 elements).
MAX_PROGRAMS = 512
ELEMENTS_PER_PROGRAM = 8192

#: Largest matrix the kernels take: their offsets are 32-bit and run up to
#: the size plus one block.
MAX_NUMEL = 2**31 - 2**20


@functools.cache
def triton_installed():
    """Whether Triton can be imported.

    Returns
    -------
    bool

    Example
    -------
    >>> isinstance(triton_installed(), bool)
    True
    """
    return importlib.util.find_spec("triton") is not None


def supports(weights):
    """Whether ``triton_kernels`` gates these weights.

    Arguments
    ---------
    weights : list of torch.Tensor
        The matrices of one call.

    Returns
    -------
    bool
        True for contiguous float32 CUDA tensors (below ``MAX_NUMEL``
        elements each) when Triton is installed and has not failed in this
        process (``triton_failed``).

    Example
    -------
    >>> supports([torch.zeros(4, 4)])  # a CPU tensor
    False
    """
    return (
        bool(weights)
        and not triton_failed()
        and all(
            w.is_cuda
            and w.dtype == torch.float32
            and w.is_contiguous()
            and w.numel() < MAX_NUMEL
            for w in weights
        )
        and triton_installed()
    )


def _kernels():
    """The module ``kernels.triton_kernels`` (imports Triton)."""
    return importlib.import_module("speechbrain_spg.kernels.triton_kernels")


def programs_per_matrix(numels):
    """Programs per matrix of every launch of a call, from the sizes.

    Arguments
    ---------
    numels : list of int
        Element counts of the call's matrices (a program whose share lies
        beyond its matrix does nothing).

    Returns
    -------
    int
        Enough programs for the largest matrix to give each about
        ``ELEMENTS_PER_PROGRAM`` elements, at most ``MAX_PROGRAMS``.

    Example
    -------
    >>> programs_per_matrix([1024 * 1024, 4096 * 1024])
    512
    >>> programs_per_matrix([12, 3])
    1
    """
    largest = max(numels)
    wanted = -(-largest // ELEMENTS_PER_PROGRAM)
    return max(1, min(MAX_PROGRAMS, wanted))


def _launches(count, slots):
    """``(first, stop)`` of each launch over ``count`` matrices."""
    return [(i, min(i + slots, count)) for i in range(0, count, slots)]


def _filled(items, filler, slots):
    """``items`` padded to ``slots`` entries (unused kernel arguments)."""
    return list(items) + [filler] * (slots - len(items))


def _device_guard(tensor):
    """The tensor's CUDA device made current (Triton launches on the
    current device); nothing for a CPU tensor (Triton's interpreter)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


class PartialWriteError(RuntimeError):
    """A Triton launch failed after earlier launches of the same in-place
    call had written their gradients: no fallback can start over."""


def _launch_all(kernel, weights, tensors, vectors, partial, in_place=False):
    """Launches ``kernel`` over ``weights``, ``SLOTS`` matrices at a time.

    ``tensors`` are per-matrix lists passed slot by slot (weights, outputs,
    gradients), ``vectors`` the per-matrix vectors of the whole call
    (thresholds, ...), ``partial`` the ``(matrices, programs)`` buffer.
    When the launches write ``in_place``, a failure after the first launch
    raises ``PartialWriteError``.
    """
    kernels = _kernels()
    programs = partial.shape[1]
    with _device_guard(weights[0]):
        for first, stop in _launches(len(weights), kernels.SLOTS):
            try:
                kernel[(programs, stop - first)](
                    *(
                        arg
                        for items in tensors
                        for arg in _filled(
                            items[first:stop], items[first], kernels.SLOTS
                        )
                    ),
                    *_filled(
                        [w.numel() for w in weights[first:stop]],
                        0,
                        kernels.SLOTS,
                    ),
                    first,
                    *vectors,
                    partial,
                    float(SIGMOID_SATURATION),
                    BLOCK_SIZE=kernels.BLOCK,
                )
            except Exception as error:
                if first == 0 or not in_place:
                    raise
                raise PartialWriteError(
                    f"Triton gate launch for matrices {first}-{stop - 1} "
                    f"failed after earlier launches had run: {error}"
                ) from error


def _partial_sums(weights):
    """An unset ``(matrices, programs)`` float32 buffer for one call."""
    programs = programs_per_matrix([w.numel() for w in weights])
    return torch.empty(
        len(weights), programs, device=weights[0].device, dtype=torch.float32
    )


def _forward(weights, thresholds, taus, dtype=None):
    """Gated weights (in ``dtype`` if given) and soft-zero counts (1-D)."""
    out_dtype = weights[0].dtype if dtype is None else dtype
    gated = [torch.empty_like(w, dtype=out_dtype) for w in weights]
    # One buffer of partial sums for every launch, added up once.
    partial = _partial_sums(weights)
    _launch_all(
        _kernels().gate_forward_kernel,
        weights,
        [weights, gated],
        [thresholds.contiguous(), taus.contiguous()],
        partial,
    )
    return gated, partial.sum(dim=1)


def _backward_into(
    weights, thresholds, taus, grads, grad_zeros, grad_weights
):  # fmt: skip
    """Writes the weight gradients into ``grad_weights`` (which may be
    ``grads``: in place); returns the threshold gradients (1-D)."""
    partial = _partial_sums(weights)
    _launch_all(
        _kernels().gate_backward_kernel,
        weights,
        [weights, grads, grad_weights],
        [
            thresholds.contiguous(),
            taus.contiguous(),
            grad_zeros.to(torch.float32).contiguous(),
        ],
        partial,
        in_place=grad_weights is grads,
    )
    return partial.sum(dim=1)


def _backward_inplace(weights, thresholds, taus, grads, grad_zeros):
    """Recomputing backward; ``grads`` (``W``'s dtype, contiguous) become
    the weight gradients; returns the threshold gradients."""
    return _backward_into(weights, thresholds, taus, grads, grad_zeros, grads)


def _backward_upcast(weights, thresholds, taus, grads, grad_zeros):
    """Recomputing backward from lower-precision gradients: new weight
    gradients in ``W``'s dtype, and the threshold gradients."""
    grads = [grad.contiguous() for grad in grads]
    grad_weights = [torch.empty_like(w) for w in weights]
    sums = _backward_into(
        weights, thresholds, taus, grads, grad_zeros, grad_weights
    )
    return grad_weights, sums


#: Set by the first failure of a Triton kernel in this process: from then
#: on ``supports`` says no, so the gate uses the ``torch.compile`` kernels,
#: one block per call (``chunks.matrices_per_call``).
_FAILURE = {"failed": False}


def triton_failed():
    """Whether a Triton gate kernel failed in this process.

    Returns
    -------
    bool

    Example
    -------
    >>> isinstance(triton_failed(), bool)
    True
    """
    return _FAILURE["failed"]


def _with_fallback(triton_fn, fallback_fn):
    """``triton_fn``, or ``fallback_fn`` from its first failure on (with a
    warning; also for later calls, see ``triton_failed``): a Triton problem
    must not stop a training run. A failure after an in-place launch had
    run (``PartialWriteError``) is raised: starting over would apply the
    gradient's factor twice."""

    return with_fallback(
        triton_fn,
        fallback_fn,
        _FAILURE,
        f"The Triton gate kernel {triton_fn.__name__} failed ({{error}}); "
        "using the torch.compile kernels from now on.",
        fatal=(PartialWriteError,),
    )


@functools.cache
def triton_kernels(fallback):
    """The ``GateKernels`` that run the Triton kernels.

    Arguments
    ---------
    fallback : GateKernels
        Used for the backward that reads the mask back from the gated
        weight (not the CUDA default), for the soft-zero counts of ungated
        matrices, and for everything after a Triton failure.

    Returns
    -------
    GateKernels

    Example
    -------
    >>> from speechbrain_spg.kernels import EAGER
    >>> triton_kernels(EAGER).name
    'triton'
    """
    return GateKernels(
        "triton",
        _with_fallback(_forward, fallback.forward),
        _with_fallback(_backward_inplace, fallback.backward),
        _with_fallback(_backward_upcast, fallback.backward_upcast),
        fallback.backward_from_gated,
        fallback.soft_zeros,
    )
