"""Hand-written Triton gate kernels (``triton_gate``) vs the eager math.

The kernels run on a GPU in training; here they also run in Triton's
interpreter on the CPU (``TRITON_INTERPRET=1``, set before Triton is
imported, so in a subprocess), which checks their arithmetic, indexing and
partial sums everywhere the suite runs.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from speechbrain_spg import batched_gate, triton_gate
from speechbrain_spg.batched_gate import (
    EAGER_BATCH_KERNELS,
    FusedPinchAllFunction,
    batch_kernels_for,
    compiled_batch_kernels,
)

HAS_CUDA = torch.cuda.is_available()

#: Seven matrices: two launches (six slots, then one), mixed shapes, a
#: matrix of one element and one larger than a program's share.
SHAPES = [(24, 16), (1, 1), (7, 3), (33, 17), (5, 40), (2, 2), (130, 70)]


def _inputs(device, seed=0):
    """Weights, thresholds, temperatures and soft-zero gradients."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    # Some weights far above their threshold: the clipped sigmoid.
    weights[3][0, :5] = 3.0
    thresholds = torch.rand(len(SHAPES), generator=gen) * 0.1 + 0.02
    taus = torch.rand(len(SHAPES), generator=gen) * 1e-3 + 1e-4
    grad_zeros = torch.randn(len(SHAPES), generator=gen)
    return [
        [w.to(device) for w in weights],
        thresholds.to(device),
        taus.to(device),
        grad_zeros.to(device),
    ]


def _max_error(actual, expected):
    """Largest ``|a - e| / (1 + |e|)`` over tensors (float64)."""
    return max(
        float(((a.double() - e.double()).abs() / (1 + e.double().abs())).max())
        for a, e in zip(actual, expected)
    )


def compare_with_eager(device):
    """Largest relative errors of the Triton kernels vs the eager batch
    math: forward (float32 and bfloat16 out), in-place and up-casting
    backward; also whether the in-place backward wrote into ``grads``."""
    from speechbrain_spg.triton_gate import (
        _backward_inplace,
        _backward_upcast,
        _forward,
    )

    weights, thresholds, taus, grad_zeros = _inputs(device)
    eager = EAGER_BATCH_KERNELS
    errors = {}
    gated, zeros = _forward(weights, thresholds, taus)
    gated_e, zeros_e = eager.forward(weights, thresholds, taus)
    errors["forward"] = _max_error(gated, gated_e)
    errors["soft_zeros"] = _max_error([zeros], [zeros_e])
    gated16, zeros16 = _forward(weights, thresholds, taus, torch.bfloat16)
    gated16_e, _ = eager.forward(weights, thresholds, taus, torch.bfloat16)
    errors["forward_bf16_dtype"] = str(gated16[0].dtype)
    errors["forward_bf16"] = _max_error(gated16, gated16_e)
    errors["soft_zeros_bf16"] = _max_error([zeros16], [zeros_e])

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(w.shape, generator=gen).to(device) for w in weights]
    grads_e = [g.clone() for g in grads]
    ids = [g.data_ptr() for g in grads]
    sums = _backward_inplace(weights, thresholds, taus, grads, grad_zeros)
    sums_e = eager.backward(weights, thresholds, taus, grads_e, grad_zeros)
    errors["backward_weights"] = _max_error(grads, grads_e)
    errors["backward_thresholds"] = _max_error([sums], [sums_e])
    errors["in_place"] = [g.data_ptr() for g in grads] == ids

    low = [g.bfloat16() for g in grads_e]
    up, up_sums = _backward_upcast(weights, thresholds, taus, low, grad_zeros)
    up_e, up_sums_e = eager.backward_upcast(
        weights, thresholds, taus, low, grad_zeros
    )
    errors["upcast_dtype"] = str(up[0].dtype)
    errors["upcast_weights"] = _max_error(up, up_e)
    errors["upcast_thresholds"] = _max_error([up_sums], [up_sums_e])
    return errors


def _assert_close_to_eager(errors):
    """Float32 rounding: the kernels and the eager math compute the same
    expressions in another order (sums) and with another exp."""
    for key in (
        "forward",
        "soft_zeros",
        "soft_zeros_bf16",
        "backward_weights",
        "backward_thresholds",
        "upcast_weights",
        "upcast_thresholds",
    ):
        assert errors[key] < 2e-5, (key, errors[key])
    # One bfloat16 rounding step of ``W * M`` at most.
    assert errors["forward_bf16"] < 8e-3
    assert errors["forward_bf16_dtype"] == "torch.bfloat16"
    assert errors["upcast_dtype"] == "torch.float32"
    assert errors["in_place"] is True


@pytest.mark.skipif(
    not triton_gate.triton_installed(), reason="Triton is not installed"
)
def test_triton_kernels_match_the_eager_math_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [
            str(Path(__file__).parent),
            str(Path(__file__).parents[1]),
            env.get("PYTHONPATH", ""),
        ]
    )
    code = (
        "import json, test_triton_gate as t; "
        "print(json.dumps(t.compare_with_eager('cpu')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_close_to_eager(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_triton_kernels_match_the_eager_math_on_cuda():
    _assert_close_to_eager(compare_with_eager("cuda"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_batch_kernels_for_picks_triton_on_cuda():
    weights = [torch.zeros(4, 4, device="cuda")]
    kernels = batch_kernels_for(weights, compiled=True)
    assert kernels is triton_gate.triton_batch_kernels(
        compiled_batch_kernels("cuda")
    )
    assert batch_kernels_for([w.double() for w in weights], True) is (
        compiled_batch_kernels("cuda")
    )


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fused_pinch_all_with_triton_matches_eager_gradients_on_cuda():
    weights, thresholds, taus, _ = _inputs("cuda")
    # A loss linear in the gated weights: its gradient does not depend on
    # bfloat16 roundings of ``W * M`` that may differ by one step.
    gen = torch.Generator().manual_seed(2)
    factors = [torch.randn(w.shape, generator=gen).cuda() for w in weights]
    results = []
    for kernels in (
        EAGER_BATCH_KERNELS,
        batch_kernels_for(weights, compiled=True),
    ):
        ws = [w.clone().requires_grad_() for w in weights]
        ts = thresholds.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            zeros, *gated = FusedPinchAllFunction.apply(
                ts, taus, kernels, None, torch.bfloat16, *ws
            )
        loss = sum((g.float() * c).sum() for g, c in zip(gated, factors))
        loss = loss + zeros.sum()
        loss.backward()
        results.append([zeros.detach(), ts.grad] + [w.grad for w in ws])
    assert _max_error(results[1], results[0]) < 1e-4


def _pinch_all_step(kernels, weights, thresholds, taus, out_dtype, unused):
    """Outputs and gradients of ``FusedPinchAllFunction`` with ``kernels``;
    the gated weights at positions ``unused`` take no part in the loss."""
    ws = [w.clone().requires_grad_() for w in weights]
    ts = thresholds.clone().requires_grad_()
    zeros, *gated = FusedPinchAllFunction.apply(
        ts, taus, kernels, True, out_dtype, *ws
    )
    gen = torch.Generator().manual_seed(3)
    loss = zeros.sum()
    for i, g in enumerate(gated):
        if i not in unused:
            factor = torch.randn(g.shape, generator=gen).to(g.device)
            loss = loss + (g.float() * factor).sum()
    loss.backward()
    return [zeros.detach(), ts.grad] + [w.grad for w in ws]


def _assert_same_pinch_all_step(actual, expected, unused):
    """Same values; no weight gradient for the unused gated weights."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if i - 2 in unused:
            assert a is None and e is None
        else:
            assert _max_error([a], [e]) < 1e-5, i


def test_pinch_all_step_comparison_works_on_cpu():
    """The helpers of the CUDA test below, on CPU (compiled vs eager)."""
    weights, thresholds, taus, _ = _inputs("cpu")
    steps = [
        _pinch_all_step(k, weights, thresholds, taus, None, {1, 4})
        for k in (EAGER_BATCH_KERNELS, compiled_batch_kernels("cpu"))
    ]
    _assert_same_pinch_all_step(steps[1], steps[0], {1, 4})


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fused_pinch_all_float32_in_place_with_unused_outputs_on_cuda():
    """Without autocast (float32, in-place backward), two gated weights
    unused: Triton gives the eager numbers and no weight gradient there."""
    weights, thresholds, taus, _ = _inputs("cuda")
    triton = batch_kernels_for(weights, compiled=True)
    assert triton is not compiled_batch_kernels("cuda")
    steps = [
        _pinch_all_step(k, weights, thresholds, taus, None, {1, 4})
        for k in (EAGER_BATCH_KERNELS, triton)
    ]
    _assert_same_pinch_all_step(steps[1], steps[0], {1, 4})


def test_supports_refuses_cpu_tensors_and_empty_calls(monkeypatch):
    monkeypatch.setattr(triton_gate, "triton_installed", lambda: True)
    monkeypatch.setitem(triton_gate._FAILURE, "failed", False)
    assert triton_gate.supports([torch.zeros(3, 3)]) is False
    assert triton_gate.supports([]) is False


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

    monkeypatch.setattr(triton_gate, "triton_installed", lambda: True)
    monkeypatch.setitem(triton_gate._FAILURE, "failed", False)
    assert triton_gate.supports([FakeCuda(), FakeCuda()])
    assert not triton_gate.supports([FakeCuda(), FakeCuda(torch.bfloat16)])
    assert not triton_gate.supports([FakeCuda(contiguous=False)])
    assert not triton_gate.supports([FakeCuda(numel=triton_gate.MAX_NUMEL)])
    monkeypatch.setattr(triton_gate, "triton_installed", lambda: False)
    assert not triton_gate.supports([FakeCuda()])


def test_programs_per_matrix_spreads_the_largest_matrix():
    each = triton_gate.ELEMENTS_PER_PROGRAM
    assert triton_gate.programs_per_matrix([1]) == 1
    assert triton_gate.programs_per_matrix([each]) == 1
    assert triton_gate.programs_per_matrix([each + 1, 5]) == 2
    assert triton_gate.programs_per_matrix([10**9]) == triton_gate.MAX_PROGRAMS


def test_launches_cover_every_matrix_once():
    assert triton_gate._launches(7, 6) == [(0, 6), (6, 7)]
    assert triton_gate._launches(6, 6) == [(0, 6)]
    assert triton_gate._filled([1, 2], 0, 4) == [1, 2, 0, 0]


@pytest.fixture
def triton_not_failed(monkeypatch):
    """A process where no Triton kernel has failed (restored after)."""
    monkeypatch.setitem(triton_gate._FAILURE, "failed", False)


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

    run = triton_gate._with_fallback(broken, fallback)
    with pytest.warns(UserWarning, match="Triton gate kernel broken failed"):
        assert run(1, 2) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(3, 4) == 7
    assert calls == ["triton", "fallback", "fallback"]
    # From then on the Triton kernels are not used at all (also not for the
    # number of matrices per call).
    assert triton_gate.triton_failed()
    assert not triton_gate.supports([object()])


def test_a_failure_after_in_place_writes_is_raised_not_retried(
    triton_not_failed,
):
    def half_written(*args):
        raise triton_gate.PartialWriteError("launch 2 failed")

    def fallback(*args):
        raise AssertionError("the fallback must not redo written gradients")

    run = triton_gate._with_fallback(half_written, fallback)
    with pytest.raises(triton_gate.PartialWriteError, match="launch 2"):
        run(1)
    assert triton_gate.triton_failed()


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
        triton_gate,
        "_kernels",
        lambda: type("K", (), {"SLOTS": 6, "BLOCK": 1024})(),
    )
    weights = [torch.zeros(2, 2) for _ in range(7)]
    partial = torch.zeros(7, 1)
    kernel = _FailingKernel(fail_at=1)
    expected = triton_gate.PartialWriteError if in_place else RuntimeError
    with pytest.raises(expected, match="out of resources"):
        triton_gate._launch_all(
            kernel, weights, [weights], [], partial, in_place=in_place
        )
    assert kernel.launches == 2
    first_fails = _FailingKernel(fail_at=0)
    with pytest.raises(RuntimeError, match="out of resources") as error:
        triton_gate._launch_all(
            first_fails, weights, [weights], [], partial, in_place=True
        )
    assert not isinstance(error.value, triton_gate.PartialWriteError)


def test_triton_batch_kernels_keep_the_fallbacks_read_back_backward():
    kernels = triton_gate.triton_batch_kernels(EAGER_BATCH_KERNELS)
    assert isinstance(kernels, batched_gate.BatchKernels)
    assert kernels.backward_from_gated is (
        EAGER_BATCH_KERNELS.backward_from_gated
    )
    assert kernels.compiled is True
