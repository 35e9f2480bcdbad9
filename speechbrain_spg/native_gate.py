"""The fused gate's kernels for x86-64 CPUs, hand-written in C (AVX2 + FMA).

On a CPU the gate's cost is arithmetic: the sigmoid's exponential and the
divisions, for every gated weight, forward and backward. The kernels that
``torch.compile`` generates for ``fused_gate``'s math take about 0.85 ns per
weight forward and 0.7-0.95 ns backward on two threads, and the backward
makes two passes over the matrix (Inductor does not fuse a sum with an
in-place write of what it sums). ``native_gate_kernels.c`` does each kernel
in one pass, eight weights per AVX2 vector, with an exponential of its own
that is only ever evaluated on ``[-80, 0]`` (no subnormal intermediates):
about 0.5 ns forward and 0.33-0.45 ns backward (``benchmarks/RESULTS.md``).

The math is ``fused_gate``'s (the same clipped sigmoid, the same chain
rule), within float32 rounding: the exponential is within about 1 ulp,
``1 / (2 tau)`` and ``1 / tau`` are multiplications, ``W^2 - t^2`` is one fused
multiply-add, sums are taken per 16,384 weights in float32 and added in
double. Below a sigmoid argument of -80 the mask is 0 instead of a number
below 1.8e-35 (a fully pinched matrix gates to exact zeros), and a gated
weight below float32's smallest normal number is 0
(``fused_gate.flush_subnormal``).

The library is built at first use by the system's C compiler (``$CC``,
else ``gcc``, else ``cc``; ``torch.compile`` needs one on a CPU too), with
OpenMP (with gcc, linked to ``libgomp.so.1``: PyTorch wheels that ship a
library of that name have already loaded it, and the two then share one
OpenMP runtime, as here; a wheel with a renamed ``libgomp``, or clang's
``libomp``, gives a second thread pool), and kept in ``$SPG_CACHE_DIR`` (default
``~/.cache/speechbrain_spg``), named by a hash of the source, the flags and
the compiler, so a changed source or compiler builds anew. It runs on
x86-64 CPUs where PyTorch itself uses AVX2 (``get_cpu_capability``).
``SPG_NATIVE_KERNELS=0`` turns it off; where it cannot be built (no
compiler, another CPU) the gate uses the ``torch.compile`` kernels, with
one warning when a build was tried and failed.

``fused_gate`` calls these kernels for contiguous float32 CPU tensors
(``supports``); everything else (float64, autocast casts) goes to the
``torch.compile`` kernels.

Authors
 * speechbrain-spg developers 2026
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

#: The kernels' source, next to this module.
SOURCE = Path(__file__).with_name("native_gate_kernels.c")

#: Compiler flags: optimised, AVX2 + FMA, OpenMP, a shared library.
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")

#: Libraries linked after the source (``exp`` of the C library).
LIBRARIES = ("-lm",)

#: Environment variable that turns the kernels off when set to ``0``.
SWITCH = "SPG_NATIVE_KERNELS"

#: Environment variable naming the directory the built library is kept in.
CACHE_VARIABLE = "SPG_CACHE_DIR"


class NativeBuildError(RuntimeError):
    """The C compiler failed to build the kernels (its message attached)."""


def switched_on():
    """Whether ``SPG_NATIVE_KERNELS`` lets the kernels run (not ``0``).

    Returns
    -------
    bool

    Example
    -------
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {SWITCH: "0"}):
    ...     switched_on()
    False
    >>> with mock.patch.dict(os.environ, {SWITCH: "1"}):
    ...     switched_on()
    True
    """
    return os.environ.get(SWITCH, "1").strip() != "0"


def cpu_supported():
    """Whether this machine can run the kernels: x86-64, Linux, and a CPU
    on which PyTorch uses AVX2 (which implies FMA) or AVX-512.

    Returns
    -------
    bool

    Example
    -------
    >>> isinstance(cpu_supported(), bool)
    True
    """
    return (
        platform.system() == "Linux"
        and platform.machine() in ("x86_64", "AMD64")
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )


def find_compiler():
    """The C compiler to build with: ``$CC``, else ``gcc``, else ``cc``.

    Returns
    -------
    str or None
        Its path, or None when there is none.

    Example
    -------
    >>> compiler = find_compiler()
    >>> compiler is None or os.path.exists(compiler)
    True
    """
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_directory():
    """Where the built library is kept: ``$SPG_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/speechbrain_spg``, else ``~/.cache/speechbrain_spg``.

    Returns
    -------
    pathlib.Path

    Example
    -------
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {CACHE_VARIABLE: "/tmp/spg"}):
    ...     print(cache_directory())
    /tmp/spg
    """
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no HOME and no passwd entry (containers)
            return fallback_directory()
    return Path(base) / "speechbrain_spg"


def fallback_directory():
    """Where the library is built when the cache cannot be written: one
    directory per user in the system's temporary directory (reused by later
    processes, not one per process).

    Returns
    -------
    pathlib.Path

    Example
    -------
    >>> fallback_directory().name.startswith("speechbrain_spg-")
    True
    """
    return Path(tempfile.gettempdir()) / f"speechbrain_spg-{os.getuid()}"


def library_name(source_text, compiler):
    """File name of the library built from ``source_text`` by ``compiler``:
    a hash of the source, the flags, the compiler's path and its version.

    Arguments
    ---------
    source_text : str
        The C source.
    compiler : str
        Path of the compiler.

    Returns
    -------
    str

    Example
    -------
    >>> name = library_name("int x;", "/no/such/cc")
    >>> name.startswith("native_gate_") and name.endswith(".so")
    True
    >>> name == library_name("int y;", "/no/such/cc")
    False
    """
    version = _compiler_version(compiler)
    digest = hashlib.sha256(
        "\n".join(
            [source_text, " ".join(FLAGS + LIBRARIES), compiler, version]
        ).encode()
    ).hexdigest()
    return f"native_gate_{digest[:16]}.so"


def _compiler_version(compiler):
    """First line of ``compiler --version`` ("" if it does not run)."""
    try:
        result = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return (result.stdout.splitlines() or [""])[0]


def build(directory, compiler):
    """Builds the kernels into ``directory`` (unless already there).

    The compiler writes a temporary file that is then renamed, so processes
    building at the same time (DDP) never load a half-written library.

    Arguments
    ---------
    directory : str or pathlib.Path
        Where the library goes (created if missing).
    compiler : str
        The C compiler.

    Returns
    -------
    pathlib.Path
        The library.

    Raises
    ------
    NativeBuildError
        When the compiler fails; its output is in the message.

    Example
    -------
    >>> import tempfile
    >>> compiler = find_compiler()
    >>> if compiler and cpu_supported():
    ...     with tempfile.TemporaryDirectory() as d:
    ...         assert build(d, compiler).exists()
    """
    source_text = SOURCE.read_text()
    directory = Path(directory)
    target = directory / library_name(source_text, compiler)
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", partial, *LIBRARIES],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise NativeBuildError(
                f"{compiler} could not build {SOURCE} (exit "
                f"{result.returncode}):\n{result.stderr.strip()}"
            )
        # mkstemp made it private (0600); others sharing the cache load it.
        os.chmod(partial, 0o755 & ~_umask())
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def _umask():
    """The process's umask, read without changing it (``os.umask`` would
    set it for a moment for every thread); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _declare(library):
    """Gives the library's functions their C signatures (see the source)."""
    pointer, size, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        # weight, out, n, threshold, tau, result, threads
        "spg_forward": [pointer, pointer, size, pointer, pointer, pointer],
        # weight, n, threshold, tau, result, threads
        "spg_soft_zeros": [pointer, size, pointer, pointer, pointer],
        # weight, grad, out, n, threshold, tau, grad_zeros, result, threads
        "spg_backward": [*[pointer] * 3, size, *[pointer] * 4],
        # weight, gated, grad, out, n, threshold, tau, grad_zeros, result,
        # threads
        "spg_backward_from_gated": [*[pointer] * 4, size, *[pointer] * 4],
    }
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.argtypes = [*arguments, count]
        function.restype = None
    return library


@functools.cache
def load():
    """The built and loaded library, or None where it cannot be.

    Builds it on first use (a second or so). Nothing is tried on a machine
    the kernels do not run on (``cpu_supported``) or without a compiler;
    a build or load that fails warns once and leaves the library None, so
    the gate uses the ``torch.compile`` kernels.

    Returns
    -------
    ctypes.CDLL or None

    Example
    -------
    >>> library = load()
    >>> library is None or hasattr(library, "spg_forward")
    True
    """
    compiler = find_compiler()
    if not cpu_supported() or compiler is None:
        return None
    try:
        try:
            path = build(cache_directory(), compiler)
        except OSError:  # cache not writable (a missing source fails again)
            path = build(fallback_directory(), compiler)
        return _declare(ctypes.CDLL(str(path)))
    except (
        OSError,
        AttributeError,  # a library without the kernels' functions
        NativeBuildError,
        subprocess.SubprocessError,
    ) as error:
        warnings.warn(
            "speechbrain_spg: the native CPU gate kernels could not be built "
            f"({type(error).__name__}: {error}); using the torch.compile "
            f"kernels instead (set {SWITCH}=0 to skip this attempt).",
            stacklevel=2,
        )
        return None


def available():
    """Whether the kernels are switched on and loaded (built if needed).

    Returns
    -------
    bool

    Example
    -------
    >>> available() == (switched_on() and load() is not None)
    True
    """
    return switched_on() and load() is not None


def supports(arguments):
    """Whether the kernels take these arguments of a gate kernel call.

    Arguments
    ---------
    arguments : tuple
        The call's arguments: tensors (weights, gradients, 0-d threshold,
        temperature and gradient of the soft-zero count) and, for the
        forward, an optional output dtype.

    Returns
    -------
    bool
        True when every tensor is a plain (not a subclass) contiguous
        float32 CPU tensor, no output dtype is asked for, and the kernels
        are available.

    Example
    -------
    >>> supports((torch.zeros(4, dtype=torch.float64), torch.tensor(0.1)))
    False
    >>> supports((torch.zeros(4), torch.tensor(0.1), torch.tensor(0.2))) == available()
    True
    """
    for argument in arguments:
        if not isinstance(argument, torch.Tensor):
            if argument is not None:
                return False
        elif not _plain_float32_cpu(argument):
            return False
    return available()


def _launch(kernel, arrays, scalars, result):
    """Checks the arguments (``_check``) and runs ``kernel`` of the library
    on them, with PyTorch's intra-op thread count: the kernels all take the
    arrays' pointers, their length, the scalars' and ``result``'s pointers,
    then the threads."""
    _check(arrays, scalars)
    getattr(load(), kernel)(
        *(array.data_ptr() for array in arrays),
        arrays[0].numel(),
        *(scalar.data_ptr() for scalar in (*scalars, result)),
        torch.get_num_threads(),
    )
    return result


def forward(weight, threshold, tau, dtype=None, out=None):
    """``(W * M, sum of M)``, as ``fused_gate``'s forward kernel.

    Arguments
    ---------
    weight : torch.Tensor
        Contiguous float32 CPU weights.
    threshold : torch.Tensor
        0-d threshold ``t`` (float32, as all tensors here).
    tau : torch.Tensor
        0-d temperature.
    dtype : None
        No cast (``supports`` sends casts elsewhere).
    out : torch.Tensor, optional
        Where to write ``W * M`` (float32, the weight's size); default: new
        memory.

    Returns
    -------
    gated : torch.Tensor
        ``W * M`` (``out`` if given).
    mask_sum : torch.Tensor
        0-d sum of ``M``.

    Example
    -------
    >>> from speechbrain_spg.fused_gate import EAGER_KERNELS
    >>> run = forward if available() else EAGER_KERNELS.forward  # same math
    >>> w = torch.tensor([0.0, 1.0, 10.0])
    >>> gated, total = run(w, torch.tensor(0.5), torch.tensor(0.125))
    >>> print(gated, round(float(total), 4))
    tensor([ 0.0000,  0.9526, 10.0000]) 2.2215
    """
    if dtype is not None:
        raise ValueError("native gate kernels: no cast (dtype must be None)")
    if out is None:
        _check([weight], [threshold, tau])  # before allocating like it
        out = torch.empty_like(weight)
    result = torch.empty((), dtype=torch.float32)
    return out, _launch("spg_forward", [weight, out], [threshold, tau], result)


def soft_zeros(weight, threshold, tau):
    """``(sum of M, sum of M (1 - M) / tau)``, as ``fused_gate``'s kernel.

    Arguments
    ---------
    weight : torch.Tensor
        Contiguous float32 CPU weights.
    threshold : torch.Tensor
        0-d threshold.
    tau : torch.Tensor
        0-d temperature.

    Returns
    -------
    mask_sum, slope_sum : torch.Tensor
        0-d sums.

    Example
    -------
    >>> from speechbrain_spg.fused_gate import EAGER_KERNELS
    >>> run = soft_zeros if available() else EAGER_KERNELS.soft_zeros
    >>> w = torch.tensor([0.0, 1.0, 10.0])
    >>> sums = run(w, torch.tensor(0.5), torch.tensor(0.125))
    >>> print([round(float(s), 4) for s in sums])
    [2.2215, 1.9343]
    """
    result = torch.empty(2, dtype=torch.float32)
    _launch("spg_soft_zeros", [weight], [threshold, tau], result)
    return result[0], result[1]


def _check(arrays, scalars):
    """Refuses what the kernels would read or write wrongly: every tensor
    must be a plain contiguous float32 CPU tensor, the arrays the weight's
    size, the scalars (threshold, temperature, soft-zero gradient) one
    number each."""
    weight = arrays[0]
    for tensor in (*arrays, *scalars):
        if not _plain_float32_cpu(tensor):
            raise ValueError(
                "native gate kernel: needs contiguous float32 CPU tensors, got "
                f"{type(tensor).__name__} {tensor.dtype} on {tensor.device}"
                f"{'' if tensor.is_contiguous() else ', not contiguous'}"
            )
    for other in arrays[1:]:
        if other.numel() != weight.numel():
            raise ValueError(
                f"native gate kernel: {tuple(other.shape)} does not match "
                f"the weight's {tuple(weight.shape)}"
            )
    for scalar in scalars:
        if scalar.numel() != 1:
            raise ValueError(
                "native gate kernel: threshold, temperature and soft-zero "
                f"gradient are single numbers, got shape {tuple(scalar.shape)}"
            )


def _plain_float32_cpu(tensor):
    """A plain (not a subclass such as a fake tensor) contiguous float32
    CPU tensor: its ``data_ptr`` is memory the kernels may use."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and tensor.is_contiguous()
    )


def backward(weight, threshold, tau, grad, grad_zeros, out=None):
    """Backward recomputing the mask; ``grad`` (or ``out``) becomes the
    weight gradient.

    Arguments
    ---------
    weight : torch.Tensor
        Contiguous float32 CPU weights.
    threshold : torch.Tensor
        0-d threshold.
    tau : torch.Tensor
        0-d temperature.
    grad : torch.Tensor
        Gradient of ``W * M`` (overwritten with that of ``W`` unless
        ``out`` is given).
    grad_zeros : torch.Tensor
        0-d gradient of the soft-zero count.
    out : torch.Tensor, optional
        Where to write the gradient of ``W`` instead of ``grad``.

    Returns
    -------
    torch.Tensor
        0-d threshold gradient.

    Example
    -------
    >>> from speechbrain_spg.fused_gate import EAGER_KERNELS
    >>> run = backward if available() else EAGER_KERNELS.backward
    >>> w, grad = torch.tensor([0.0, 1.0, 10.0]), torch.ones(3)
    >>> g_t = run(w, torch.tensor(0.5), torch.tensor(0.125), grad,
    ...           torch.tensor(0.0))
    >>> print(grad, round(float(g_t), 4))
    tensor([0.2689, 1.3140, 1.0000]) -0.1807
    """
    return _launch(
        "spg_backward",
        [weight, grad, grad if out is None else out],
        [threshold, tau, grad_zeros],
        torch.empty((), dtype=torch.float32),
    )


def backward_from_gated(
    weight, gated, threshold, tau, grad, grad_zeros, out=None
):
    """Backward reading the mask back from ``gated = W * M`` (see
    ``fused_gate._backward_from_gated_math_inplace``); ``grad`` (or ``out``,
    which may be ``gated``) becomes the weight gradient.

    Arguments
    ---------
    weight : torch.Tensor
        Contiguous float32 CPU weights.
    gated : torch.Tensor
        ``W * M`` from the forward pass.
    threshold : torch.Tensor
        0-d threshold.
    tau : torch.Tensor
        0-d temperature.
    grad : torch.Tensor
        Gradient of ``W * M`` (overwritten with that of ``W`` unless
        ``out`` is given).
    grad_zeros : torch.Tensor
        0-d gradient of the soft-zero count.
    out : torch.Tensor, optional
        Where to write the gradient of ``W`` instead of ``grad``; may be
        ``gated`` (each weight is read before it is written).

    Returns
    -------
    torch.Tensor
        0-d threshold gradient.

    Example
    -------
    >>> from speechbrain_spg.fused_gate import EAGER_KERNELS as EAGER
    >>> native = available()
    >>> run = backward_from_gated if native else EAGER.backward_from_gated
    >>> w, grad = torch.tensor([0.0, 1.0, 10.0]), torch.ones(3)
    >>> t, tau = torch.tensor(0.5), torch.tensor(0.125)
    >>> gated, _ = (forward if native else EAGER.forward)(w, t, tau)
    >>> g_t = run(w, gated, t, tau, grad, torch.tensor(0.0))
    >>> print(grad, round(float(g_t), 4))
    tensor([0.2689, 1.3140, 1.0000]) -0.1807
    """
    return _launch(
        "spg_backward_from_gated",
        [weight, gated, grad, grad if out is None else out],
        [threshold, tau, grad_zeros],
        torch.empty((), dtype=torch.float32),
    )
