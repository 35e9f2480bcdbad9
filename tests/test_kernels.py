"""Every backend of the gate against the reference formula.

The ``backend`` fixture runs each test below once per backend this machine
has: the eager kernels and their ``torch.compile`` on the CPU, the
hand-written Triton kernels through Triton's interpreter on the CPU, and,
where a GPU is present, the eager, compiled and Triton kernels on CUDA
(node ids with ``cuda``; ``benchmarks/gpu_checks.sh`` selects them with
``-k cuda``). The reference is ``speechbrain_spg.gate`` under autograd
(``kernels.gate_matrices(..., "reference")``): gated weights, soft-zero counts and
the gradients of weights and thresholds must agree within float32
rounding, in float32 and under bf16 autocast.

Triton's interpreter must be switched on (``TRITON_INTERPRET=1``) before
Triton is first imported, and this process has imported it already (the
lobes' dependencies do): the interpreted backend runs the kernels in a
child process, behind the same ``GateKernels`` interface (its in-place
gradients are copied back into the caller's tensors).
"""

import os
import pickle
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from speechbrain_spg.gate import gated_weight, soft_mask, soft_zero_count
from speechbrain_spg.kernels import (
    EAGER,
    GateFunction,
    GateKernels,
    SoftZerosFunction,
    autocast_dtype,
    check_gate_impl,
    compiled,
    default_recompute_mask,
    eager,
    gate_matrices,
    gated_values,
    select_kernels,
    soft_zero_counts,
)
from speechbrain_spg.kernels import triton as triton_backend

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(
    not triton_backend.triton_installed(), reason="Triton is not installed"
)

#: CPU always; CUDA too where a GPU is present (not generated elsewhere).
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

#: The five functions of a backend, in ``GateKernels`` order.
FUNCTIONS = (
    "forward",
    "backward",
    "backward_upcast",
    "backward_from_gated",
    "soft_zeros",
)

#: The argument each in-place function overwrites (the gradients).
IN_PLACE = {"backward": 3, "backward_from_gated": 4}

#: Runs ``kernels.triton.triton_kernels(EAGER)`` in Triton's interpreter.
#: Replies go to a copy of the original stdout; what the libraries print
#: goes to stderr. A Triton failure that the kernels answered with their
#: fallback is reported as an error, not hidden.
CHILD = """
import os, pickle, sys, traceback, warnings
replies = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
from triton.runtime.interpreter import InterpretedFunction
from speechbrain_spg.kernels import EAGER
from speechbrain_spg.kernels import triton as backend
kernels = backend.triton_kernels(EAGER)
kernel = backend._kernels().gate_forward_kernel
pickle.dump(isinstance(kernel, InterpretedFunction), replies)
replies.flush()
while True:
    try:
        name, args = pickle.load(sys.stdin.buffer)
    except EOFError:
        break
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reply = ("ok", getattr(kernels, name)(*args), args)
        except Exception:
            reply = ("error", traceback.format_exc(), None)
    if reply[0] == "ok" and backend.triton_failed():
        said = "; ".join(str(w.message) for w in caught)
        reply = ("error", "Triton failed, fallback used: " + said, None)
    pickle.dump(reply, replies)
    replies.flush()
replies.close()
"""


def _detached(arg):
    """Tensors (also in lists and tuples) as new tensor objects without
    autograd identity."""
    if isinstance(arg, (list, tuple)):
        return type(arg)(_detached(item) for item in arg)
    return arg.detach() if isinstance(arg, torch.Tensor) else arg


class InterpretedTriton:
    """The Triton backend run by Triton's interpreter in a child process."""

    def __init__(self):
        env = {
            **os.environ,
            "TRITON_INTERPRET": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(REPO), os.environ.get("PYTHONPATH", "")]
            ),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert pickle.load(self.process.stdout) is True, "not interpreted"
        self.calls = []
        self.kernels = GateKernels(
            "triton", *(self._remote(name) for name in FUNCTIONS)
        )

    def _remote(self, name):
        def call(*args):
            self.calls.append(name)
            pickle.dump((name, _detached(args)), self.process.stdin)
            self.process.stdin.flush()
            status, result, returned = pickle.load(self.process.stdout)
            if status != "ok":
                raise RuntimeError(f"interpreted Triton {name}: {result}")
            if name in IN_PLACE:
                index = IN_PLACE[name]
                for mine, theirs in zip(args[index], returned[index]):
                    mine.copy_(theirs)
            # Fresh tensor objects: an unpickled tensor carries an empty
            # ``_backward_hooks`` dict, with which ``register_hook`` on an
            # autograd output would not reach its node.
            return _detached(result)

        call.__name__ = name
        return call

    def close(self):
        """Ends the child process."""
        self.process.stdin.close()
        self.process.wait(timeout=60)


@dataclass(frozen=True)
class Backend:
    """One backend under test."""

    name: str
    device: str
    kernels: GateKernels
    #: Weight dtypes it gates (the Triton kernels take float32 only).
    dtypes: tuple
    #: Whether it returns subnormal gated weights as zero (the eager math
    #: does, for x86 CPUs; the Triton kernels, GPU only, do not).
    flushes_subnormals: bool


ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: Every backend of this machine (the CUDA ones where a GPU is present).
BACKENDS = [
    "eager-cpu",
    "compiled-cpu",
    pytest.param("triton-interpreter", marks=needs_triton),
] + (
    [
        "eager-cuda",
        "compiled-cuda",
        pytest.param("triton-cuda", marks=needs_triton),
    ]
    if HAS_CUDA
    else []
)


@pytest.fixture(scope="module")
def interpreted_triton():
    """The child process of the interpreted Triton kernels."""
    interpreted = InterpretedTriton()
    yield interpreted
    interpreted.close()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """Each backend available on this machine."""
    name = request.param
    if name == "eager-cpu":
        return Backend(name, "cpu", EAGER, ALL_DTYPES, True)
    if name == "compiled-cpu":
        kernels = compiled.compiled_kernels("cpu")
        return Backend(name, "cpu", kernels, ALL_DTYPES, True)
    if name == "triton-interpreter":
        kernels = request.getfixturevalue("interpreted_triton").kernels
        return Backend(name, "cpu", kernels, (torch.float32,), False)
    if name == "eager-cuda":
        return Backend(name, "cuda", EAGER, ALL_DTYPES, True)
    if name == "compiled-cuda":
        kernels = compiled.compiled_kernels("cuda")
        return Backend(name, "cuda", kernels, ALL_DTYPES, True)
    assert name == "triton-cuda"
    kernels = triton_backend.triton_kernels(compiled.compiled_kernels("cuda"))
    return Backend(name, "cuda", kernels, (torch.float32,), False)


@pytest.fixture(autouse=True)
def no_triton_failure(request):
    """A test on the Triton kernels must not pass through their fallback."""
    yield
    if "backend" in request.fixturenames:
        if request.getfixturevalue("backend").name == "triton-cuda":
            assert not triton_backend.triton_failed()


def tolerance(backend, from_gated=False, autocast=False, atol=1e-6):
    """Float32 rounding between a backend and the reference."""
    rtol = 1e-5
    if backend.name == "triton-cuda":
        # The bounds the Triton kernels met against the eager math on an
        # H100: other sums' order, another exponential (2e-5 of 1 + |x|),
        # and under autocast gradients from bf16 roundings of W * M that
        # may differ by one step (1e-4).
        rtol = atol = 1e-4 if autocast else 2e-5
    if from_gated and backend.device == "cuda" and backend.name != "eager-cuda":
        # Seen on an H100: Triton's float32 division is not correctly
        # rounded, and near M = 1 the slope M (1 - M) magnifies the last
        # bit of the mask read back as (W M) / W (up to 5e-5 on gradients
        # of about 1). CUDA recomputes the mask by default.
        rtol = atol = 1e-4
    return {"rtol": rtol, "atol": atol}


def one_matrix(device):
    """One 64 x 48 matrix at a fresh model's scale (std 0.05)."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 48, generator=generator) * 0.05]
    thresholds = torch.tensor([0.04])
    taus = torch.tensor([0.02 * 0.05**2])
    return (
        [w.to(device) for w in weights],
        thresholds.to(device),
        taus.to(device),
    )


#: Mixed shapes, then one larger than a Triton program's share and a
#: matrix of one element. The first six have no two sizes alike and fewer
#: than 4096 elements each: torch.compile guards on such properties, and
#: would compile again for the lobes' matrices.
SHAPES = [
    (24, 16),
    (7, 3),
    (33, 17),
    (5, 40),
    (2, 9),
    (11, 13),
    (130, 70),
    (1, 1),
]


def several_matrices(device, count=None):
    """The first ``count`` (default: all) of ``SHAPES``, with their own
    thresholds and temperatures."""
    count = len(SHAPES) if count is None else count
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=generator) * 0.1 for s in SHAPES]
    # Some weights far above their threshold: the clipped sigmoid.
    weights[2][0, :5] = 3.0
    thresholds = torch.rand(len(SHAPES), generator=generator) * 0.1 + 0.02
    taus = torch.rand(len(SHAPES), generator=generator) * 1e-3 + 1e-4
    # The 1 x 1 matrix near its threshold: its gradients are not zero.
    weights[7].fill_(1.1 * thresholds[7].item())
    return (
        [w.to(device) for w in weights[:count]],
        thresholds[:count].to(device),
        taus[:count].to(device),
    )


def matrices_for(backend):
    """Several matrices for one call of ``backend``: all eight (two Triton
    launches of six slots), or for the compiled kernels one block's six
    (``chunks.MATRICES_PER_CALL``): each list length, size-1 dimension or
    large matrix compiles the kernels again, and the lobes' calls gate six
    small matrices."""
    if backend.name.startswith("compiled"):
        return several_matrices(backend.device, count=6)
    return several_matrices(backend.device)


@dataclass
class Step:
    """Outputs and gradients of one gating."""

    gated: list
    zeros: torch.Tensor
    grad_weights: list
    grad_thresholds: torch.Tensor


def step(
    kernels,
    weights,
    thresholds,
    taus,
    recompute_mask=None,
    autocast=False,
    unused=(),
    overwrite_grad=False,
):
    """Gates ``weights`` with ``kernels`` (the reference formula for None)
    and differentiates ``sum_i <W_i M_i, U_i> + 3 sum_i zeros_i``, random
    ``U_i``; the gated weights at positions ``unused`` take no part (a
    block that LayerDrop skipped). Under bf16 ``autocast`` the gated
    weights are returned in autocast's dtype, as the layers ask."""
    device = weights[0].device.type
    ws = [w.clone().requires_grad_() for w in weights]
    ts = thresholds.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out_dtype = autocast_dtype(ws[0])
        assert out_dtype == (torch.bfloat16 if autocast else None)
        if kernels is None:
            zeros, gated = gate_matrices(
                ws, ts, taus, "reference", out_dtype=out_dtype
            )
        else:
            zeros, *gated = GateFunction.apply(
                ts,
                taus,
                kernels,
                recompute_mask,
                out_dtype,
                overwrite_grad,
                *ws,
            )
            assert zeros.grad_fn.name() == "GateFunctionBackward"
    generator = torch.Generator().manual_seed(3)
    # (A gradient of the counts as a training step's has: not an expanded
    # scalar, whose zero stride would compile the kernels once more.)
    loss = (zeros * torch.full_like(zeros, 3.0)).sum()
    for i, (g, w) in enumerate(zip(gated, weights)):
        factor = torch.randn(w.shape, generator=generator).to(w.device)
        if i not in unused:
            loss = loss + (g.float() * factor).sum()
    loss.backward()
    return Step(
        [g.detach() for g in gated],
        zeros.detach(),
        [w.grad for w in ws],
        ts.grad,
    )


def assert_same_step(actual, expected, tol):
    """Same gated weights (in the same dtype), counts and gradients; no
    weight gradient where the reference has none."""
    assert len(actual.gated) == len(expected.gated)
    for a, e in zip(actual.gated, expected.gated):
        assert a.dtype == e.dtype and a.shape == e.shape
        if a.dtype == torch.bfloat16:
            # One bfloat16 rounding of W * M (assert_close's bf16 default).
            torch.testing.assert_close(a, e)
        else:
            torch.testing.assert_close(a, e, **tol)
    torch.testing.assert_close(actual.zeros, expected.zeros, **tol)
    for a, e in zip(actual.grad_weights, expected.grad_weights):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.dtype == e.dtype == torch.float32
            torch.testing.assert_close(a, e, **tol)
    assert actual.grad_thresholds.dtype == torch.float32
    torch.testing.assert_close(
        actual.grad_thresholds, expected.grad_thresholds, **tol
    )


#: Float32 with the mask computed again in the backward, or read back from
#: the gated weight; bf16 autocast (gated weights cast in the kernel, the
#: backward from low-precision gradients).
CASES = {
    "float32-recompute": {"recompute_mask": True, "autocast": False},
    "float32-from-gated": {"recompute_mask": False, "autocast": False},
    "bf16-autocast": {"recompute_mask": None, "autocast": True},
}


@pytest.mark.parametrize("inputs", ["one-matrix", "several-matrices"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference(backend, case, inputs):
    """The backend gives the reference's gated weights, soft-zero counts
    and weight and threshold gradients, for one matrix per call and for
    several."""
    if inputs == "one-matrix":
        weights, thresholds, taus = one_matrix(backend.device)
    else:
        weights, thresholds, taus = matrices_for(backend)
    options = CASES[case]
    expected = step(
        None, weights, thresholds, taus, autocast=options["autocast"]
    )
    actual = step(backend.kernels, weights, thresholds, taus, **options)
    tol = tolerance(
        backend,
        from_gated=options["recompute_mask"] is False,
        autocast=options["autocast"],
    )
    assert_same_step(actual, expected, tol)
    # The gradients are not trivially zero.
    assert (actual.grad_thresholds.abs() > 0).all()
    assert all(g.abs().sum() > 0 for g in actual.grad_weights)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16"])
def test_unused_gated_weights_get_no_gradient(backend, autocast):
    """Gated weights that take no part in the loss (a block that LayerDrop
    skipped, gated in the same call) give their weights no gradient at all
    (not a zero one, which Adam would use), as on the reference path; their
    thresholds still get the soft-zero counts' gradients."""
    weights, thresholds, taus = matrices_for(backend)
    unused = {1, 4}
    expected = step(
        None, weights, thresholds, taus, autocast=autocast, unused=unused
    )
    actual = step(
        backend.kernels,
        weights,
        thresholds,
        taus,
        recompute_mask=True,
        autocast=autocast,
        unused=unused,
    )
    assert [g is None for g in actual.grad_weights] == [
        i in unused for i in range(len(weights))
    ]
    assert (actual.grad_thresholds != 0).all()
    assert_same_step(
        actual, expected, tolerance(backend, autocast=autocast, atol=1e-5)
    )


@pytest.mark.parametrize("recompute_mask", [False, True])
def test_weights_far_above_the_threshold_pass_unchanged(
    backend, recompute_mask
):
    """(W^2 - t^2) / (2 tau) from 80 (the clip) to about 5000: M = 1
    exactly, so W * M = W, M sums to the size, and the weight gradient
    is the upstream gradient itself, as on the reference path."""
    dtypes = [d for d in (torch.float32, torch.float64) if d in backend.dtypes]
    for dtype in dtypes:
        weight = torch.linspace(0.04, 0.3, 600, dtype=dtype).reshape(20, 30)
        threshold = torch.tensor([0.01], dtype=dtype)
        tau = torch.tensor([8e-6], dtype=dtype)
        generator = torch.Generator().manual_seed(4)
        upstream = torch.randn(20, 30, dtype=dtype, generator=generator)
        weight, tau, upstream = (
            x.to(backend.device) for x in (weight, tau, upstream)
        )
        t = threshold.to(backend.device).requires_grad_()
        w = weight.clone().requires_grad_()
        zeros, gated = GateFunction.apply(
            t, tau, backend.kernels, recompute_mask, None, False, w
        )
        (gated * upstream).sum().backward()
        assert gated.dtype == dtype
        assert torch.equal(gated.detach(), weight)
        assert zeros.item() == 0.0
        assert torch.equal(w.grad, upstream)
        assert t.grad.item() == 0.0


def subnormal_case(device):
    """Weights whose gated value is subnormal on the reference path: at
    W = +-1e-5 the argument of the sigmoid is -79 (above the clip at -80),
    M = 4.9e-35 and W * M = 4.9e-40; 0.5 and 1.0 are far above t. Columns
    0 and 1 hold the tiny weights."""
    tau = torch.tensor([1e-3])
    threshold = torch.tensor([(1e-10 + 2 * 79 * 1e-3) ** 0.5])
    weight = torch.tensor([[1e-5, -1e-5, 0.5, 1.0]] * 4)
    return weight.to(device), threshold.to(device), tau.to(device)


@pytest.mark.parametrize("recompute_mask", [False, True])
def test_no_subnormal_gated_weights(backend, recompute_mask):
    """A subnormal gated weight slows down every matrix product that reads
    it on x86 CPUs (1.48x a trained tiny model's step); the eager math
    returns 0 there, less than float32's smallest normal number away. The
    gradients are the reference's."""
    weight, threshold, tau = subnormal_case(backend.device)
    tiny = torch.finfo(torch.float32).tiny
    reference = gated_weight(weight, threshold[0], tau[0])
    assert (reference[:, :2].abs() < tiny).all()
    if backend.device == "cpu":
        assert (reference[:, :2] != 0).all()
    w = weight.clone().requires_grad_()
    t = threshold.clone().requires_grad_()
    zeros, gated = GateFunction.apply(
        t, tau, backend.kernels, recompute_mask, None, False, w
    )
    values = gated.detach()
    assert torch.equal(values[:, 2:], weight[:, 2:])
    if backend.flushes_subnormals:
        assert torch.equal(values[:, :2], torch.zeros_like(weight[:, :2]))
    else:
        assert (values[:, :2].abs() < tiny).all()
    upstream = torch.linspace(-1.0, 1.0, 16, device=backend.device)
    upstream = upstream.reshape(4, 4)
    ((gated * upstream).sum() + 2.0 * zeros[0]).backward()
    w_ref = weight.clone().requires_grad_()
    t_ref = threshold[0].clone().requires_grad_()
    ref_zeros = soft_zero_count(w_ref, t_ref, tau[0])
    ref_gated = gated_weight(w_ref, t_ref, tau[0])
    ((ref_gated * upstream).sum() + 2.0 * ref_zeros).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        t.grad, t_ref.grad.reshape(1), rtol=1e-5, atol=1e-6
    )


def test_non_finite_weights_stay_visible(backend):
    """A NaN weight gives a NaN gated weight (the recipe skips such
    steps); flushing subnormals leaves it alone."""
    weight, threshold, tau = subnormal_case(backend.device)
    weight[0, 2] = float("nan")
    with torch.no_grad():  # as the gate calls its kernels
        (gated,), _ = backend.kernels.forward([weight], threshold, tau)
    assert torch.isnan(gated[0, 2])
    assert not torch.isnan(gated[1:]).any()
    assert torch.equal(gated[:, 3], weight[:, 3])
    if backend.flushes_subnormals:
        assert gated[0, 0] == 0
    else:
        assert gated[0, 0].abs() < torch.finfo(torch.float32).tiny


def test_non_finite_weights_give_a_non_finite_count(backend):
    """As on the reference path, a NaN weight makes its matrix's soft-zero
    count NaN (the sparsity loss then shows it too)."""
    weight, threshold, tau = subnormal_case(backend.device)
    weight[0, 2] = float("nan")
    assert torch.isnan(soft_zero_count(weight, threshold[0], tau[0]))
    with torch.no_grad():
        _, zeros = backend.kernels.forward([weight], threshold, tau)
    assert torch.isnan(zeros[0])


def _gate_inputs(device):
    """One matrix and the reference gradient of ``<W * M, U>``."""
    torch.manual_seed(0)
    w = (torch.randn(16, 8) * 0.05).to(device).requires_grad_()
    t = torch.tensor([0.04], device=device, requires_grad=True)
    tau = torch.tensor([0.02 * 0.05**2], device=device)
    upstream = torch.randn(16, 8).to(device)
    (expected,) = torch.autograd.grad(
        gated_weight(w, t[0], tau[0]), w, upstream
    )
    return w, t, tau, upstream, expected


@pytest.mark.parametrize("recompute_mask", [False, True])
def test_weight_gradient_reuses_the_incoming_buffer_on_request(
    backend, recompute_mask
):
    """With overwrite_grad the backward writes the weight gradient into the
    gradient autograd hands it (no new weight-sized tensor)."""
    w, t, tau, upstream, expected = _gate_inputs(backend.device)
    seen = {}

    def keep(grad):
        seen["incoming"] = grad
        return grad

    _, gated = GateFunction.apply(
        t, tau, backend.kernels, recompute_mask, None, True, w
    )
    gated.register_hook(keep)
    (grad_w,) = torch.autograd.grad(gated, w, upstream.clone())
    assert grad_w.data_ptr() == seen["incoming"].data_ptr()
    torch.testing.assert_close(grad_w, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recompute_mask", [False, True])
def test_gradients_seen_by_user_code_are_left_alone(backend, recompute_mask):
    """Without overwrite_grad (the default), gradients the caller can see
    stay intact: given grad_outputs, a second backward through a retained
    graph, and a gradient shared with another branch of the graph."""
    w, t, tau, upstream, expected = _gate_inputs(backend.device)
    _, gated = GateFunction.apply(
        t, tau, backend.kernels, recompute_mask, None, False, w
    )
    given = upstream.clone()
    for _ in range(2):
        (grad_w,) = torch.autograd.grad(gated, w, given, retain_graph=True)
        torch.testing.assert_close(given, upstream)
        torch.testing.assert_close(grad_w, expected, rtol=1e-5, atol=1e-7)
    # gated + h: the addition hands both branches the same gradient tensor.
    h = torch.zeros(16, 8, device=backend.device, requires_grad=True)
    _, gated = GateFunction.apply(
        t, tau, backend.kernels, recompute_mask, None, False, w
    )
    grad_w, grad_h = torch.autograd.grad(gated + h, (w, h), upstream)
    torch.testing.assert_close(grad_h, upstream)
    torch.testing.assert_close(grad_w, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [8e-6, 1e-3])
def test_mask_read_back_from_gated_weight_at_zero_and_tiny_weights(
    backend, tau
):
    """The backward that divides W * M by W must, at W = 0, at weights so
    small that W * M underflows and at masks that underflow, give the
    gradients of the recomputed mask (within float32 rounding).

    tau 8e-6: the mask of 3e-3 underflows float32 (about 1e-43); tau 1e-3:
    the mask at W = 0 is sigmoid(-0.8) = 0.31, so the value taken there
    matters.
    """
    weight = torch.tensor(
        [0.0, -0.0, 1e-39, 1e-30, -1e-25, 1e-20, 3e-3, 0.02, -0.04, 0.05]
        + [0.3, -2.0]
    ).reshape(3, 4)
    weight = weight.to(backend.device)
    threshold = torch.tensor([0.04], device=backend.device)
    upstream = torch.linspace(-1.0, 1.0, 12, device=backend.device)
    upstream = upstream.reshape(3, 4)
    taus = torch.tensor([tau], device=backend.device)

    def grads(recompute):
        w = weight.clone().requires_grad_()
        t = threshold.clone().requires_grad_()
        zeros, gated = GateFunction.apply(
            t, taus, backend.kernels, recompute, None, False, w
        )
        ((gated * upstream).sum() + 2.0 * zeros[0]).backward()
        return w.grad, t.grad

    recomputed = grads(True)
    from_gated = grads(False)
    if tau == 1e-3:
        assert recomputed[0].flatten()[:2].abs().min() > 0.1  # M(0) * U
    assert torch.isfinite(from_gated[0]).all()
    for fast, ref in zip(from_gated, recomputed):
        torch.testing.assert_close(
            fast, ref, **tolerance(backend, from_gated=True)
        )


def test_fused_backward_refuses_double_backward(backend):
    """The fused backward is not differentiable: asking for a second-order
    gradient fails loudly instead of returning wrong numbers."""
    w, t, tau, upstream, _ = _gate_inputs(backend.device)
    zeros, gated = GateFunction.apply(
        t, tau, backend.kernels, None, None, False, w
    )
    (grad_t,) = torch.autograd.grad(
        (gated * upstream).sum() + zeros[0], t, create_graph=True
    )
    with pytest.raises(RuntimeError, match="does not require grad|once_diff"):
        grad_t.sum().backward()


def test_soft_zeros_of_ungated_matrices_match_reference(backend):
    """The counts of matrices a pass did not gate (``SoftZerosFunction``,
    the backend's ``soft_zeros``) and their threshold gradients are the
    reference's; the weights get no gradient."""
    weights, thresholds, taus = matrices_for(backend)
    ws = [w.clone().requires_grad_() for w in weights]
    ts = thresholds.clone().requires_grad_()
    counts = SoftZerosFunction.apply(ts, taus, backend.kernels, *ws)
    assert counts.grad_fn.name() == "SoftZerosFunctionBackward"
    factors = torch.linspace(0.5, 2.0, len(weights), device=backend.device)
    (counts * factors).sum().backward()
    assert all(w.grad is None for w in ws)
    ts_ref = thresholds.clone().requires_grad_()
    expected = torch.stack(
        [soft_zero_count(w, ts_ref[i], taus[i]) for i, w in enumerate(weights)]
    )
    (expected * factors).sum().backward()
    torch.testing.assert_close(
        counts.detach(), expected.detach(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(ts.grad, ts_ref.grad, rtol=1e-5, atol=1e-5)
    assert (ts.grad > 0).all()
    # The slopes: sum(M (1 - M) / tau) per matrix, the count's derivative
    # in t divided by t.
    with torch.no_grad():
        _, slopes = backend.kernels.soft_zeros(weights, thresholds, taus)
    masks = [
        soft_mask(w.double(), thresholds[i].double(), taus[i].double())
        for i, w in enumerate(weights)
    ]
    expected_slopes = torch.stack(
        [(m * (1 - m)).sum() / taus[i].double() for i, m in enumerate(masks)]
    )
    torch.testing.assert_close(
        slopes.double(), expected_slopes, rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_weights_get_accurate_gradients(device, dtype):
    """16-bit weights take the recomputing backward by default: a mask read
    back from a 16-bit W * M would be off by 8% (bfloat16) to 70% (float16,
    whose smallest normal number, 6e-5, is the size of small weights).
    The compiled kernels compute in float32 and round the result to the
    weights' dtype (the eager ones compute in that dtype)."""
    torch.manual_seed(0)
    weight = (torch.randn(64, 48) * 0.05).to(dtype).to(device)
    threshold = torch.tensor([0.05]).to(dtype).to(device)
    tau = torch.tensor([0.05 * 0.05**2]).to(dtype).to(device)
    upstream = torch.randn(64, 48, dtype=torch.float64).to(device)
    # Exact gradient at the same (rounded) numbers, in float64.
    w = weight.double().requires_grad_()
    gated = gated_weight(w, threshold.double()[0], tau.double()[0])
    (gated * upstream).sum().backward()
    exact = w.grad
    w = weight.clone().requires_grad_()
    kernels = compiled.compiled_kernels(device)
    _, gated = GateFunction.apply(threshold, tau, kernels, None, None, False, w)
    assert gated.dtype == dtype
    (gated.double() * upstream).sum().backward()
    assert w.grad.dtype == dtype
    error = (w.grad.double() - exact).abs()
    assert (error <= 0.02 * exact.abs() + 1e-3 * exact.abs().max()).all()


# --- The backend interface: choices, policies, fallbacks -------------------


def test_check_gate_impl_names_the_allowed_values():
    for name in ("fused", "compiled", "reference"):
        assert check_gate_impl(name) == name
    with pytest.raises(ValueError) as error:
        check_gate_impl("fast")
    assert str(error.value) == (
        "gate_impl: must be one of 'fused', 'compiled', 'reference', "
        "got 'fast'."
    )
    with pytest.raises(ValueError, match="got 'Fused'"):
        select_kernels([torch.zeros(2, 2)], "Fused")


def test_select_kernels_on_cpu(monkeypatch):
    weights = [torch.zeros(3, 4), torch.zeros(2, 2)]
    assert select_kernels(weights, "fused") is EAGER
    assert EAGER.name == "eager"
    chosen = select_kernels(weights, "compiled")
    assert chosen is compiled.compiled_kernels("cpu")
    assert chosen.name == "compiled"
    # float64 and 16-bit weights too: no Triton on a CPU.
    assert select_kernels(
        [torch.zeros(2, dtype=torch.float64)], "compiled"
    ) is (chosen)
    with pytest.raises(ValueError, match="'reference' runs no kernels"):
        select_kernels(weights, "reference")
    # Where Triton takes the weights: its kernels, with the compiled ones as
    # their fallback.
    monkeypatch.setattr(triton_backend, "supports", lambda weights: True)
    chosen = select_kernels(weights, "compiled")
    assert chosen is triton_backend.triton_kernels(
        compiled.compiled_kernels("cpu")
    )
    assert chosen.name == "triton"
    assert select_kernels(weights, "fused") is EAGER


@needs_cuda
def test_select_kernels_on_cuda():
    weights = [torch.zeros(4, 4, device="cuda")]
    assert select_kernels(weights, "fused") is EAGER
    fallback = compiled.compiled_kernels("cuda")
    if triton_backend.triton_installed():
        assert select_kernels(weights, "compiled") is (
            triton_backend.triton_kernels(fallback)
        )
    else:
        assert select_kernels(weights, "compiled") is fallback
    doubles = [w.double() for w in weights]
    assert select_kernels(doubles, "compiled") is fallback


def test_triton_kernels_keep_the_fallbacks_read_back_backward():
    kernels = triton_backend.triton_kernels(EAGER)
    assert isinstance(kernels, GateKernels) and kernels.name == "triton"
    assert kernels is triton_backend.triton_kernels(EAGER)  # one per fallback
    assert kernels.backward_from_gated is EAGER.backward_from_gated
    assert kernels.soft_zeros is EAGER.soft_zeros
    assert kernels.forward is not EAGER.forward


def test_autocast_dtype():
    weight = torch.zeros(2, 3)
    assert autocast_dtype(weight) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(weight) == torch.bfloat16
        # Only float32 weights are cast by autocast's matrix products.
        assert autocast_dtype(weight.double()) is None
        assert autocast_dtype(weight.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert autocast_dtype(weight) == torch.float16


def test_default_recompute_mask_on_cpu():
    weight = torch.zeros(2, 3)
    assert default_recompute_mask(weight) is False
    assert default_recompute_mask(weight.double()) is False
    assert default_recompute_mask(weight.half()) is True
    assert default_recompute_mask(weight.bfloat16()) is True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert default_recompute_mask(weight) is True


@needs_cuda
def test_default_recompute_mask_on_cuda():
    assert default_recompute_mask(torch.zeros(2, 3, device="cuda")) is True


def _saved(kernels, recompute_mask, out_dtype, weights):
    """How many tensors ``GateFunction`` saves for its backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    thresholds = torch.full((len(weights),), 0.5)
    taus = torch.full((len(weights),), 0.05)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        GateFunction.apply(
            thresholds,
            taus,
            kernels,
            recompute_mask,
            out_dtype,
            False,
            *weights,
        )
    return len(saved)


def test_gate_function_saves_the_gated_weights_only_to_read_masks_back():
    """thresholds, taus and the weights always; the gated weights too where
    the backward reads the masks back from them (the default for float32
    on a CPU), never when they are returned in another dtype."""
    weights = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    assert _saved(EAGER, None, None, weights) == 2 + 2 + 2
    assert _saved(EAGER, False, None, weights) == 2 + 2 + 2
    assert _saved(EAGER, True, None, weights) == 2 + 2
    assert _saved(EAGER, False, torch.bfloat16, weights) == 2 + 2
    # out_dtype equal to the weights' dtype: no cast, the default policy.
    assert _saved(EAGER, None, torch.float32, weights) == 2 + 2 + 2
    halves = [w.detach().bfloat16().requires_grad_() for w in weights]
    assert _saved(EAGER, None, None, halves) == 2 + 2


def test_with_eager_fallback_warns_once_and_stays_eager():
    calls = []

    def broken(x, items, dtype):
        calls.append("compiled")
        # The compiled function gets plain tensors (no autograd identity).
        assert not x.requires_grad and not items[0].requires_grad
        assert dtype is torch.bfloat16
        raise RuntimeError("no C++ compiler")

    def forward(x, items, dtype):
        calls.append("eager")
        return x.detach() + 1

    run = compiled.with_eager_fallback(broken, forward)
    x = torch.zeros(2, requires_grad=True)
    with pytest.warns(UserWarning) as caught:
        assert torch.equal(run(x, [x], torch.bfloat16), torch.ones(2))
    assert [str(w.message) for w in caught] == [
        "torch.compile failed on the SPG gate kernel forward (RuntimeError: "
        "no C++ compiler); using the eager kernel from now on."
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run(x, [x], torch.bfloat16), torch.ones(2))
    assert calls == ["compiled", "eager", "eager"]


def test_compile_failure_falls_back_to_the_eager_numbers():
    """A backend whose every compiled function fails gives the eager
    backend's numbers, with one warning per function that ran."""

    def broken(*args):
        raise RuntimeError("no compiler")

    kernels = GateKernels(
        "compiled",
        *(
            compiled.with_eager_fallback(broken, getattr(eager, name))
            for name in FUNCTIONS
        ),
    )
    weights, thresholds, taus = several_matrices("cpu")
    with pytest.warns(UserWarning) as caught:
        actual = step(kernels, weights, thresholds, taus, recompute_mask=True)
    expected = step(EAGER, weights, thresholds, taus, recompute_mask=True)
    assert_same_step(actual, expected, {"rtol": 0, "atol": 0})
    names = sorted(
        str(w.message).split("kernel ")[1].split(" (")[0] for w in caught
    )
    assert names == ["backward", "forward"]


def test_compiled_kernels_are_made_once_per_device_type():
    kernels = compiled.compiled_kernels("cpu")
    assert kernels is compiled.compiled_kernels("cpu")
    assert kernels.name == "compiled"
    assert all(
        getattr(kernels, name) is not getattr(EAGER, name) for name in FUNCTIONS
    )


@pytest.fixture
def triton_not_failed(monkeypatch):
    """A process where no Triton kernel has failed (restored after)."""
    monkeypatch.setitem(triton_backend._FAILURE, "failed", False)


def test_a_failing_triton_kernel_falls_back_with_one_warning(
    triton_not_failed,
):
    calls = []

    def broken(*args):
        calls.append("triton")
        raise RuntimeError("no ptxas")

    def fallback(*args):
        calls.append("fallback")
        return sum(args)

    run = triton_backend._with_fallback(broken, fallback)
    with pytest.warns(UserWarning, match="Triton gate kernel broken failed"):
        assert run(1, 2) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(3, 4) == 7
    assert calls == ["triton", "fallback", "fallback"]
    # From then on the Triton kernels are not used at all (also not for the
    # number of matrices per call).
    assert triton_backend.triton_failed()
    assert not triton_backend.supports([object()])


@needs_triton
def test_triton_kernels_that_cannot_run_fall_back_to_their_fallback(
    triton_not_failed,
):
    """Compiled (not interpreted) Triton kernels cannot gate CPU tensors:
    the first call warns, returns the fallback's numbers, and the process
    uses the fallback from then on (``select_kernels`` too)."""
    kernels = triton_backend.triton_kernels(EAGER)
    weights, thresholds, taus = several_matrices("cpu")
    with pytest.warns(UserWarning, match="Triton gate kernel _forward failed"):
        gated, zeros = kernels.forward(weights, thresholds, taus)
    expected_gated, expected_zeros = EAGER.forward(weights, thresholds, taus)
    assert torch.equal(zeros, expected_zeros)
    assert all(torch.equal(a, e) for a, e in zip(gated, expected_gated))
    assert triton_backend.triton_failed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = [torch.ones_like(w) for w in weights]
        kernels.backward(weights, thresholds, taus, grads, torch.ones(8))
    assert not any(torch.equal(g, torch.ones_like(g)) for g in grads)


def test_a_failure_after_in_place_writes_is_raised_not_retried(
    triton_not_failed,
):
    def half_written(*args):
        raise triton_backend.PartialWriteError("launch 2 failed")

    def fallback(*args):
        raise AssertionError("the fallback must not redo written gradients")

    run = triton_backend._with_fallback(half_written, fallback)
    with pytest.raises(triton_backend.PartialWriteError, match="launch 2"):
        run(1)
    assert triton_backend.triton_failed()


class _FailingKernel:
    """A kernel whose launches fail from the ``fail_at``-th one."""

    def __init__(self, fail_at):
        self.fail_at, self.launches = fail_at, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            if self.launches > self.fail_at:
                raise RuntimeError("out of resources")

        return launch


@pytest.mark.parametrize("in_place", [False, True])
def test_launch_failures_after_the_first_launch(monkeypatch, in_place):
    """Seven matrices take two launches; the second fails. Only in-place
    launches make that unrecoverable."""
    monkeypatch.setattr(
        triton_backend,
        "_kernels",
        lambda: type("K", (), {"SLOTS": 6, "BLOCK": 1024})(),
    )
    weights = [torch.zeros(2, 2) for _ in range(7)]
    partial = torch.zeros(7, 1)
    kernel = _FailingKernel(fail_at=1)
    expected = triton_backend.PartialWriteError if in_place else RuntimeError
    with pytest.raises(expected, match="out of resources"):
        triton_backend._launch_all(
            kernel, weights, [weights], [], partial, in_place=in_place
        )
    assert kernel.launches == 2
    first_fails = _FailingKernel(fail_at=0)
    with pytest.raises(RuntimeError, match="out of resources") as error:
        triton_backend._launch_all(
            first_fails, weights, [weights], [], partial, in_place=True
        )
    assert not isinstance(error.value, triton_backend.PartialWriteError)


def test_supports_refuses_cpu_tensors_and_empty_calls(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton_installed", lambda: True)
    monkeypatch.setitem(triton_backend._FAILURE, "failed", False)
    assert triton_backend.supports([torch.zeros(3, 3)]) is False
    assert triton_backend.supports([]) is False


def test_supports_checks_dtype_layout_and_size_on_cuda(monkeypatch):
    """The checks other than the device, with ``is_cuda`` faked."""

    class FakeCuda:
        is_cuda = True

        def __init__(self, dtype=torch.float32, contiguous=True, numel=16):
            self.dtype, self._contiguous, self._numel = dtype, contiguous, numel

        def is_contiguous(self):
            return self._contiguous

        def numel(self):
            return self._numel

    monkeypatch.setattr(triton_backend, "triton_installed", lambda: True)
    monkeypatch.setitem(triton_backend._FAILURE, "failed", False)
    assert triton_backend.supports([FakeCuda(), FakeCuda()])
    assert not triton_backend.supports([FakeCuda(), FakeCuda(torch.bfloat16)])
    assert not triton_backend.supports([FakeCuda(contiguous=False)])
    assert not triton_backend.supports(
        [FakeCuda(numel=triton_backend.MAX_NUMEL)]
    )
    assert triton_backend.supports(
        [FakeCuda(numel=triton_backend.MAX_NUMEL - 1)]
    )
    # After a failure in this process: never again.
    monkeypatch.setitem(triton_backend._FAILURE, "failed", True)
    assert not triton_backend.supports([FakeCuda()])
    monkeypatch.setitem(triton_backend._FAILURE, "failed", False)
    monkeypatch.setattr(triton_backend, "triton_installed", lambda: False)
    assert not triton_backend.supports([FakeCuda()])


def test_programs_per_matrix_spreads_the_largest_matrix():
    each = triton_backend.ELEMENTS_PER_PROGRAM
    assert triton_backend.programs_per_matrix([1]) == 1
    assert triton_backend.programs_per_matrix([each]) == 1
    assert triton_backend.programs_per_matrix([each + 1, 5]) == 2
    assert triton_backend.programs_per_matrix([10**9]) == (
        triton_backend.MAX_PROGRAMS
    )


def test_launches_cover_every_matrix_once():
    assert triton_backend._launches(7, 6) == [(0, 6), (6, 7)]
    assert triton_backend._launches(6, 6) == [(0, 6)]
    assert triton_backend._filled([1, 2], 0, 4) == [1, 2, 0, 0]


@needs_triton
def test_interpreted_triton_really_runs_the_triton_kernels(interpreted_triton):
    """The interpreted backend's forward and recomputing backward run in
    the child (its read-back backward and soft-zero counts are the
    fallback's, as on CUDA)."""
    weights, thresholds, taus = several_matrices("cpu")
    interpreted_triton.calls.clear()
    actual = step(
        interpreted_triton.kernels,
        weights,
        thresholds,
        taus,
        recompute_mask=True,
    )
    expected = step(None, weights, thresholds, taus)
    assert interpreted_triton.calls == ["forward", "backward"]
    assert_same_step(actual, expected, {"rtol": 1e-5, "atol": 1e-6})


# --- The eager backend's helpers and the entry points ----------------------


def test_flush_subnormal_in_every_floating_dtype():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        tiny = torch.finfo(dtype).tiny
        x = torch.tensor([tiny / 4, -tiny / 2, tiny, -2.0, 0.0], dtype=dtype)
        flushed = eager.flush_subnormal(x)
        assert flushed.dtype == dtype
        assert flushed.tolist() == [0.0, 0.0, tiny, -2.0, 0.0]
    nan = eager.flush_subnormal(torch.tensor([float("nan"), float("inf")]))
    assert torch.isnan(nan[0]) and nan[1] == float("inf")


@pytest.mark.parametrize("device", DEVICES)
def test_row_sums(device):
    x = torch.arange(6.0, device=device).reshape(2, 3)
    if device == "cuda":
        # Rows reduce in parallel on a GPU; the caller adds them up.
        assert eager.row_sums(x).tolist() == [3.0, 12.0]
    else:
        assert eager.row_sums(x).shape == ()
        assert eager.row_sums(x).item() == 15.0


def test_mask_from_gated_uses_the_mask_at_zero_where_the_quotient_fails():
    threshold, tau = torch.tensor(0.04), torch.tensor(1e-3)
    weight = torch.tensor([0.0, -0.0, 1e-39, 1e-30, 0.03, 0.05, 0.3])
    mask = soft_mask(weight, threshold, tau)
    read = eager.mask_from_gated(weight, weight * mask, threshold, tau)
    at_zero = torch.sigmoid(-threshold * threshold / (2 * tau))
    assert torch.isfinite(read).all()
    assert torch.equal(read[:4], at_zero.expand(4))
    torch.testing.assert_close(read, mask, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "compiled", "reference"])
def test_entry_points_give_the_reference_numbers(impl, device):
    """``gate``, ``gated_values`` and ``soft_zero_counts`` of every
    ``gate_impl`` give the reference's values (in ``out_dtype`` when
    asked); ``gated_values`` builds no graph."""
    # Six matrices: what the compiled kernels compile for anyway.
    weights, thresholds, taus = several_matrices(device, count=6)
    expected = [
        gated_weight(w, thresholds[i], taus[i]) for i, w in enumerate(weights)
    ]
    expected_zeros = torch.stack(
        [
            soft_zero_count(w, thresholds[i], taus[i])
            for i, w in enumerate(weights)
        ]
    )
    ts = thresholds.clone().requires_grad_()
    zeros, gated = gate_matrices(weights, ts, taus, impl)
    for g, e in zip(gated, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zeros, expected_zeros, rtol=1e-5, atol=1e-5)
    assert zeros.requires_grad and zeros.shape == (6,)
    values = gated_values(weights, ts, taus, impl)
    assert all(not v.requires_grad for v in values)
    for v, e in zip(values, expected):
        torch.testing.assert_close(v, e, rtol=1e-5, atol=1e-6)
    with torch.autocast(device, dtype=torch.bfloat16):  # as the layers ask
        halves = gated_values(weights, ts, taus, impl, torch.bfloat16)
    assert all(h.dtype == torch.bfloat16 for h in halves)
    for h, e in zip(halves, expected):
        torch.testing.assert_close(h, e.bfloat16())
    same = gated_values(weights, ts, taus, impl, torch.float32)
    assert all(s.dtype == torch.float32 for s in same)
    counts = soft_zero_counts(weights, ts, taus, impl)
    torch.testing.assert_close(counts, expected_zeros, rtol=1e-5, atol=1e-5)
    expected_node = {
        "reference": "StackBackward0",
    }.get(impl, "SoftZerosFunctionBackward")
    assert counts.grad_fn.name() == expected_node
    (grad,) = torch.autograd.grad(counts.sum(), ts)
    assert (grad > 0).all()


@pytest.mark.parametrize("name", ["eager", "compiled"])
def test_float64_gradients_match_autograd(name):
    """In float64 the fused backward (mask recomputed or read back) and
    the soft-zero counts' backward give autograd's gradients of the
    reference formula to 1e-12."""
    kernels = EAGER if name == "eager" else compiled.compiled_kernels("cpu")
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 16, dtype=torch.float64, generator=generator)
    threshold = torch.tensor([0.6], dtype=torch.float64)
    tau = torch.tensor([0.08], dtype=torch.float64)
    upstream = torch.randn(32, 16, dtype=torch.float64, generator=generator)

    w_ref = weight.clone().requires_grad_()
    t_ref = threshold.clone().requires_grad_()
    gated_ref = gated_weight(w_ref, t_ref[0], tau[0])
    (gated_ref * upstream).sum().backward()
    assert abs(t_ref.grad.item()) > 1e-3  # not trivially zero
    for recompute_mask in (True, False):
        w = weight.clone().requires_grad_()
        t = threshold.clone().requires_grad_()
        _, gated = GateFunction.apply(
            t, tau, kernels, recompute_mask, None, False, w
        )
        (gated * upstream).sum().backward()
        assert (gated - gated_ref).abs().max().item() <= 1e-12
        assert (w.grad - w_ref.grad).abs().max().item() <= 1e-12
        assert abs(t.grad.item() - t_ref.grad.item()) <= 1e-12

    t_ref = threshold.clone().requires_grad_()
    count_ref = soft_zero_count(weight, t_ref[0], tau[0])
    count_ref.backward()
    t = threshold.clone().requires_grad_()
    count = SoftZerosFunction.apply(t, tau, kernels, weight)
    count.backward(torch.ones_like(count))
    assert abs(count.item() - count_ref.item()) <= 1e-12
    assert abs(t.grad.item() - t_ref.grad.item()) <= 1e-12
    assert t.grad.item() > 0  # a larger threshold pinches more weights


@pytest.mark.parametrize("recompute_mask", [False, True])
def test_gate_function_gradcheck(recompute_mask):
    """Numerical gradients of the fused function (weights, thresholds)
    and of the soft-zero counts (thresholds only)."""
    generator = torch.Generator().manual_seed(7)
    weights = [
        torch.randn(s, dtype=torch.float64, generator=generator) * 0.5
        for s in [(4, 3), (2, 5)]
    ]
    weights = [w.requires_grad_() for w in weights]
    thresholds = torch.tensor([0.4, 0.6], dtype=torch.float64)
    thresholds.requires_grad_()
    taus = torch.tensor([0.05, 0.1], dtype=torch.float64)

    def run(t, *w):
        return GateFunction.apply(
            t, taus, EAGER, recompute_mask, None, False, *w
        )

    # The gated weights in weights and thresholds; the counts, by design,
    # in the thresholds only (the weights are constants to them).
    assert torch.autograd.gradcheck(
        lambda t, *w: run(t, *w)[1:], (thresholds, *weights), eps=1e-6
    )
    plain = [w.detach() for w in weights]
    assert torch.autograd.gradcheck(
        lambda t: run(t, *plain)[0], (thresholds,), eps=1e-6
    )
    run(thresholds, *weights)[0].sum().backward()
    assert all(w.grad is None for w in weights)
    assert (thresholds.grad > 0).all()
    assert torch.autograd.gradcheck(
        lambda t: SoftZerosFunction.apply(t, taus, EAGER, *plain),
        (thresholds,),
        eps=1e-6,
    )


def test_weights_far_below_the_threshold_are_pinched_to_zero(backend):
    """(W^2 - t^2) / (2 tau) < -80 for every weight: the mask is 0 (the
    sigmoid is below 1.8e-35 there): nothing kept, nothing counted as
    kept, no gradient. Just above -80 the mask is the sigmoid, a normal
    float32 number."""
    device = backend.device
    weight = torch.full((8, 8), 1e-3, device=device)
    threshold = torch.tensor([1.0], device=device)
    tau = torch.tensor([1e-3], device=device)
    w = weight.clone().requires_grad_()
    t = threshold.clone().requires_grad_()
    zeros, gated = GateFunction.apply(
        t, tau, backend.kernels, True, None, False, w
    )
    assert torch.equal(gated.detach(), torch.zeros_like(weight))
    assert zeros.item() == 64.0
    (gated.sum() + zeros[0]).backward()
    assert torch.equal(w.grad, torch.zeros_like(weight))
    assert t.grad.item() == 0.0
    threshold = torch.tensor([(1e-6 + 2 * 79.5 * 1e-3) ** 0.5], device=device)
    with torch.no_grad():
        (gated,), _ = backend.kernels.forward([weight], threshold, tau)
    expected = 1e-3 * torch.sigmoid(torch.tensor(-79.5, dtype=torch.float64))
    torch.testing.assert_close(
        gated.double().cpu(), expected.expand(8, 8), rtol=1e-4, atol=0
    )


def test_a_compiled_caller_traces_the_gate_without_graph_breaks():
    """A model compiled whole (``fullgraph=True``) traces through the fused
    gate, with the numbers of the uncompiled model."""

    def loss(w, t, tau):
        zeros, (gated,) = gate_matrices([w], t, tau, "fused")
        return (gated * gated).sum() + zeros.sum()

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 32, generator=generator) * 0.02
    threshold, tau = torch.tensor([0.018]), torch.tensor([0.02 * 0.02**2])
    results = []
    for run in (loss, torch.compile(loss, fullgraph=True)):
        w = weight.clone().requires_grad_()
        t = threshold.clone().requires_grad_()
        value = run(w, t, tau)
        value.backward()
        results.append((value.detach(), w.grad, t.grad))
    for eager_value, compiled_value in zip(*results):
        torch.testing.assert_close(
            compiled_value, eager_value, rtol=1e-4, atol=1e-6
        )
    assert results[0][2].abs().item() > 0
