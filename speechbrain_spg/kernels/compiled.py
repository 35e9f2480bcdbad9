"""The eager backend's functions through ``torch.compile``.

``torch.compile`` fuses each function's element-wise math into few kernels
(C++ on a CPU with a compiler, Triton on CUDA). A compiler problem must not
stop a training run: each function falls back to its eager version, with a
warning, from its first failure on.

Authors
 * speechbrain-spg developers 2026
"""

import functools

import torch

from speechbrain_spg.kernels import GateKernels, eager, with_fallback


def _plain(arg):
    """A tensor (or each of a list of tensors) as a plain view without
    autograd identity: Dynamo gives parameters static shapes, which would
    compile once per weight shape. Anything else unchanged."""
    if isinstance(arg, (list, tuple)):
        return [_plain(item) for item in arg]
    return arg.detach() if isinstance(arg, torch.Tensor) else arg


def with_eager_fallback(compiled, fallback, state=None, device_type="cpu"):
    """``compiled`` (given plain tensors), or ``fallback`` from its first
    failure on (``kernels.with_fallback``).

    Arguments
    ---------
    compiled, fallback : callable
        The compiled function and the eager one it was compiled from.
    state : dict, optional
        Failure state shared with other functions (default: its own).
    device_type : str
        Autocast is switched off there around the call: the kernels cast
        themselves, and a graph compiled with autocast on and one with it
        off would be two compilations of the same math.

    Returns
    -------
    callable

    Example
    -------
    >>> run = with_eager_fallback(torch.neg, torch.neg)
    >>> run(torch.ones(2))
    tensor([-1., -1.])
    """
    name = getattr(fallback, "__name__", "kernel")

    def run(*args):
        with torch.autocast(device_type, enabled=False):
            return compiled(*(_plain(arg) for arg in args))

    return with_fallback(
        run,
        fallback,
        {"failed": False} if state is None else state,
        f"torch.compile failed on the SPG gate kernel {name} ({{error}}); "
        "using the eager kernel from now on.",
    )


@functools.cache
def compiled_kernels(device_type):
    """The compiled gate kernels of a device type (one set per process).

    Arguments
    ---------
    device_type : str
        ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    GateKernels
        Compiled on first use for the list structure of that call (the
        lobes always pass the same ones). After one function fails to
        compile, all of them run eager (one warning).

    Example
    -------
    >>> kernels = compiled_kernels("cpu")
    >>> kernels.name, kernels is compiled_kernels("cpu")
    ('compiled', True)
    """
    state = {"failed": False}
    forward, backward, upcast, from_gated, soft_zeros = (
        with_eager_fallback(
            torch.compile(f, dynamic=True, fullgraph=True),
            f,
            state,
            device_type,
        )
        for f in (
            eager.forward,
            eager.backward,
            eager.backward_upcast,
            eager.backward_from_gated,
            eager.soft_zeros,
        )
    )
    return GateKernels(
        "compiled",
        forward,
        backward,
        upcast,
        from_gated,
        functools.partial(_one_by_one, soft_zeros),
    )


def _one_by_one(soft_zeros, weights, thresholds, taus):
    """``soft_zeros`` called on one matrix at a time: the matrices a pass
    did not gate (LayerDrop) vary in number from step to step, and every
    new list length would compile again."""
    counts, slopes = zip(
        *(
            soft_zeros([w], thresholds[i : i + 1], taus[i : i + 1])
            for i, w in enumerate(weights)
        )
    )
    return torch.cat(counts), torch.cat(slopes)
