"""The eager backend's functions through ``torch.compile``.

``torch.compile`` fuses each function's element-wise math into few kernels
(C++ on a CPU with a compiler, Triton on CUDA). A compiler problem must not
stop a training run: each function falls back to its eager version, with a
warning, from its first failure on.

Authors
 * speechbrain-spg developers 2026
"""

import functools
import warnings

import torch

from speechbrain_spg.kernels import GateKernels, eager


def _plain(arg):
    """A tensor (or each of a list of tensors) as a plain view without
    autograd identity: Dynamo gives parameters static shapes, which would
    compile once per weight shape. Anything else unchanged."""
    if isinstance(arg, (list, tuple)):
        return [_plain(item) for item in arg]
    return arg.detach() if isinstance(arg, torch.Tensor) else arg


def with_eager_fallback(compiled, fallback):
    """``compiled``, or ``fallback`` from its first failure on.

    Arguments
    ---------
    compiled : callable
        The compiled function.
    fallback : callable
        The function to use once ``compiled`` failed.

    Returns
    -------
    callable

    Example
    -------
    >>> def broken(x):
    ...     raise RuntimeError("no compiler")
    >>> run = with_eager_fallback(broken, lambda x: x + 1)
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     run(1), run(2)
    (2, 3)
    >>> len(caught)  # warned once
    1
    """
    failed = []

    def run(*args):
        if not failed:
            try:
                return compiled(*(_plain(arg) for arg in args))
            except Exception as error:  # noqa: BLE001 - any compiler problem
                failed.append(error)
                name = getattr(fallback, "__name__", "kernel")
                warnings.warn(
                    f"torch.compile failed on the SPG gate kernel {name} "
                    f"({type(error).__name__}: {error}); using the eager "
                    "kernel from now on.",
                    stacklevel=2,
                )
        return fallback(*args)

    return run


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
        lobes always pass the same ones).

    Example
    -------
    >>> kernels = compiled_kernels("cpu")
    >>> kernels.name, kernels is compiled_kernels("cpu")
    ('compiled', True)
    """
    functions = (
        eager.forward,
        eager.backward,
        eager.backward_upcast,
        eager.backward_from_gated,
        eager.soft_zeros,
    )
    return GateKernels(
        "compiled",
        *(
            with_eager_fallback(
                torch.compile(f, dynamic=True, fullgraph=True), f
            )
            for f in functions
        ),
    )
