"""The hand-written C kernels of the gate (``native_gate``) on this CPU.

They must give ``fused_gate``'s math (computed here in float64) within
float32 rounding, for any length (full AVX2 vectors, a partial last
vector, several OpenMP chunks), leave weights far above their threshold
exactly unchanged, be picked for contiguous float32 CPU tensors only, and
be built once per source and compiler, with a clear error and the
``torch.compile`` kernels where the build fails.
"""

import os
import stat
import tempfile

import pytest
import torch

from speechbrain_spg import fused_gate, native_gate
from speechbrain_spg.fused_gate import (
    FusedPinchFunction,
    _backward_from_gated_math_inplace,
    _backward_math_inplace,
    _forward_math,
    _soft_zeros_math,
)

pytestmark = pytest.mark.skipif(
    not native_gate.available(),
    reason="native kernels need an x86-64 Linux CPU with AVX2 and a C compiler",
)

#: One vector, partial vectors, one chunk exactly, chunk + 1, several chunks.
SIZES = [1, 7, 8, 9, 100, 16384, 16385, 3 * 16384 + 13]
STD = 0.02


def gate_inputs(numel, seed=0):
    """Weights like a fresh model's (std 0.02, some exact zeros, some far
    above the threshold), threshold and temperature at the defaults' scale,
    a gradient and the soft-zero count's gradient."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(numel, generator=generator) * STD
    weight[::11] = 0.0
    weight[5::13] *= 50.0  # far above the threshold: sigmoid exactly 1
    threshold = torch.tensor(0.9 * STD)
    tau = torch.tensor(0.02 * STD**2)
    grad = torch.randn(numel, generator=generator) * 1e-3
    return weight, threshold, tau, grad, torch.tensor(0.7)


def in_float64(*tensors):
    return [t.double() for t in tensors]


#: float32 rounding: a few units in the last place of 1.
EPS = 4 * torch.finfo(torch.float32).eps


def assert_close(native, truth, atol=0.0, rtol=1e-5):
    """``native`` (float32) equals the float64 ``truth`` within ``rtol``
    relative, ``atol`` absolute."""
    torch.testing.assert_close(native.double(), truth, rtol=rtol, atol=atol)


def values_close(native, truth):
    """Element values (gated weights, weight gradients): within 1e-5 of the
    largest one (the exponential and the quotients are good to a few ulp;
    ``M (1 - M)`` near ``M = 1`` cancels)."""
    assert_close(native, truth, atol=1e-5 * truth.abs().max().item())


def mask_sum_close(native, truth, numel):
    """A sum of masks: each mask within a few ulp of 1."""
    assert_close(native, truth, atol=numel * EPS)


def slope_sum_close(native, truth, numel, tau, factor=1.0):
    """A sum of ``factor * M (1 - M) / tau``: each ``1 - M`` is as good as
    ``M``'s rounding, a few ulp of 1, whatever its size."""
    assert_close(native, truth, atol=numel * EPS / float(tau) * factor)


@pytest.mark.parametrize("numel", SIZES)
def test_forward_and_soft_zeros_match_the_math(numel):
    weight, threshold, tau, _, _ = gate_inputs(numel)
    gated, mask_sum = native_gate.forward(weight, threshold, tau)
    true_gated, true_sum = _forward_math(*in_float64(weight, threshold, tau))
    assert gated.shape == weight.shape and gated.dtype == torch.float32
    values_close(gated, true_gated)
    mask_sum_close(mask_sum, true_sum, numel)
    mask_sum, slope_sum = native_gate.soft_zeros(weight, threshold, tau)
    true_mask, true_slope = _soft_zeros_math(
        *in_float64(weight, threshold, tau)
    )
    mask_sum_close(mask_sum, true_mask, numel)
    slope_sum_close(slope_sum, true_slope, numel, tau)


@pytest.mark.parametrize("numel", SIZES)
def test_both_backwards_match_the_math(numel):
    weight, threshold, tau, grad, grad_zeros = gate_inputs(numel)
    w64, t64, tau64, g64, gz64 = in_float64(
        weight, threshold, tau, grad, grad_zeros
    )
    true_grad = g64.clone()
    true_threshold_grad = _backward_math_inplace(
        w64, t64, tau64, true_grad, gz64
    )
    # t * sum(slope * (g_zeros - g W)): each slope within EPS / tau.
    factor = float(threshold) * float(grad_zeros + (grad * weight).abs().max())
    recomputed = grad.clone()
    threshold_grad = native_gate.backward(
        weight, threshold, tau, recomputed, grad_zeros
    )
    values_close(recomputed, true_grad)
    slope_sum_close(threshold_grad, true_threshold_grad, numel, tau, factor)
    gated, _ = native_gate.forward(weight, threshold, tau)
    from_gated = grad.clone()
    threshold_grad = native_gate.backward_from_gated(
        weight, gated, threshold, tau, from_gated, grad_zeros
    )
    values_close(from_gated, true_grad)
    slope_sum_close(threshold_grad, true_threshold_grad, numel, tau, factor)
    # The same quotient rule as the float32 eager kernel, element by element.
    eager = grad.clone()
    _backward_from_gated_math_inplace(
        weight, gated, threshold, tau, eager, grad_zeros
    )
    torch.testing.assert_close(from_gated, eager, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("numel", [9, 3 * 16384 + 13])
def test_outputs_elsewhere_match_the_in_place_kernels(numel):
    """``out=``: the forward writes into given memory; the backwards leave
    ``grad`` alone and write the same numbers into ``out``, which may be
    the gated weight itself (each weight read before it is written)."""
    weight, threshold, tau, grad, grad_zeros = gate_inputs(numel)
    gated, total = native_gate.forward(weight, threshold, tau)
    given = torch.full_like(weight, float("nan"))
    into, total_into = native_gate.forward(weight, threshold, tau, out=given)
    assert into is given and torch.equal(into, gated)
    assert torch.equal(total, total_into)
    for kernel, extra in (
        (native_gate.backward, ()),
        (native_gate.backward_from_gated, (gated,)),
    ):
        in_place = grad.clone()
        expected = kernel(weight, *extra, threshold, tau, in_place, grad_zeros)
        read_only = grad.clone()
        out = torch.empty_like(weight)
        got = kernel(
            weight, *extra, threshold, tau, read_only, grad_zeros, out=out
        )
        assert torch.equal(read_only, grad)
        assert torch.equal(out, in_place) and torch.equal(got, expected)
    over_gated = gated.clone()
    got = native_gate.backward_from_gated(
        weight, over_gated, threshold, tau, grad, grad_zeros, out=over_gated
    )
    assert torch.equal(over_gated, in_place) and torch.equal(got, expected)


def test_weights_far_above_the_threshold_pass_exactly():
    weight = torch.linspace(1.0, 3.0, 1003)  # z >= 80 with these t, tau
    threshold, tau = torch.tensor(0.1), torch.tensor(0.002)
    gated, mask_sum = native_gate.forward(weight, threshold, tau)
    assert torch.equal(gated, weight)
    assert mask_sum.item() == 1003.0
    grad = torch.randn(1003)
    for backward in ("backward", "backward_from_gated"):
        new = grad.clone()
        args = (gated,) if backward == "backward_from_gated" else ()
        threshold_grad = getattr(native_gate, backward)(
            weight, *args, threshold, tau, new, torch.tensor(1.0)
        )
        assert torch.equal(new, grad), backward
        assert threshold_grad.item() == 0.0, backward


def test_subnormal_gated_weights_are_zero():
    # At W = +-1e-5 and a sigmoid argument of -79 (not clipped), W * M is
    # 4.9e-40, subnormal: the kernel writes 0 (fused_gate.flush_subnormal),
    # keeps normal values and a NaN, and counts the mask as before.
    threshold = torch.tensor((1e-10 + 2 * 79 * 1e-3) ** 0.5)
    tau = torch.tensor(1e-3)
    weight = torch.tensor([1e-5, -1e-5, 0.5, float("nan")] * 5)
    gated, mask_sum = native_gate.forward(weight, threshold, tau)
    assert torch.equal(gated[0::4], torch.zeros(5))
    assert torch.equal(gated[1::4], torch.zeros(5))
    assert torch.equal(gated[2::4], torch.full((5,), 0.5))
    assert torch.isnan(gated[3::4]).all()
    eager, _ = _forward_math(weight, threshold, tau)
    assert torch.equal(gated[:3], eager[:3])


def test_weights_far_below_the_threshold_are_pinched_to_zero():
    # z = (W^2 - t^2) / (2 tau) < -80 for every weight: the mask is 0 (the
    # sigmoid is below 1.8e-35 there), and no subnormal is computed.
    weight = torch.full((64,), 1e-3)
    threshold, tau = torch.tensor(1.0), torch.tensor(1e-3)
    gated, mask_sum = native_gate.forward(weight, threshold, tau)
    assert torch.equal(gated, torch.zeros(64)) and mask_sum.item() == 0.0
    grad = torch.ones(64)
    threshold_grad = native_gate.backward(
        weight, threshold, tau, grad, torch.tensor(1.0)
    )
    assert torch.equal(grad, torch.zeros(64)) and threshold_grad.item() == 0.0
    # Just above -80 the mask is the sigmoid, a normal float32 number.
    threshold = torch.tensor((1e-6 + 2 * 79.5 * 1e-3) ** 0.5)
    gated, _ = native_gate.forward(weight, threshold, tau)
    expected = 1e-3 * torch.sigmoid(torch.tensor(-79.5, dtype=torch.float64))
    torch.testing.assert_close(
        gated.double(), expected.expand(64), rtol=1e-4, atol=0
    )


def test_nan_weights_stay_nan():
    weight = torch.tensor([0.01, float("nan"), 0.03] + [0.02] * 13)
    gated, mask_sum = native_gate.forward(
        weight, torch.tensor(0.01), torch.tensor(1e-5)
    )
    assert gated[1].isnan() and mask_sum.isnan()
    assert not gated[[0, 2]].isnan().any()


def test_thread_count_changes_no_element():
    weight, threshold, tau, grad, grad_zeros = gate_inputs(5 * 16384 + 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            gated, mask_sum = native_gate.forward(weight, threshold, tau)
            new = grad.clone()
            threshold_grad = native_gate.backward_from_gated(
                weight, gated, threshold, tau, new, grad_zeros
            )
            results.append((gated, mask_sum, new, threshold_grad))
    finally:
        torch.set_num_threads(threads)
    (g1, s1, n1, t1), (g2, s2, n2, t2) = results
    assert torch.equal(g1, g2) and torch.equal(n1, n2)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)
    torch.testing.assert_close(t1, t2, rtol=1e-6, atol=0)


def test_arguments_the_kernels_cannot_read_are_refused():
    weight, threshold, tau, grad, grad_zeros = gate_inputs(16)
    with pytest.raises(ValueError, match="float32 CPU tensors, got Tensor"):
        native_gate.forward(weight, threshold.double(), tau)
    strided = torch.zeros(32)[::2]  # the weight's size, every other float
    with pytest.raises(ValueError, match="not contiguous"):
        native_gate.backward(weight, threshold, tau, strided, grad_zeros)
    with pytest.raises(ValueError, match=r"single numbers, got shape \(2,\)"):
        native_gate.soft_zeros(weight, torch.tensor([0.1, 0.2]), tau)
    fake = torch.Tensor._make_subclass(torch.Tensor, weight).as_subclass(
        type("Sub", (torch.Tensor,), {})
    )
    assert not native_gate.supports((fake, threshold, tau))
    with pytest.raises(ValueError, match="got Sub"):
        native_gate.forward(fake, threshold, tau)


def test_mismatched_sizes_are_refused():
    weight, threshold, tau, _, grad_zeros = gate_inputs(16)
    with pytest.raises(ValueError, match=r"\(8,\) does not match .*\(16,\)"):
        native_gate.backward(weight, threshold, tau, torch.zeros(8), grad_zeros)
    with pytest.raises(ValueError, match="no cast"):
        native_gate.forward(weight, threshold, tau, torch.bfloat16)


def test_supports_only_contiguous_float32_cpu_tensors(monkeypatch):
    weight, threshold, tau, _, _ = gate_inputs(12)
    assert native_gate.supports((weight, threshold, tau))
    assert native_gate.supports((weight, threshold, tau, None))
    assert not native_gate.supports((weight.double(), threshold, tau))
    assert not native_gate.supports((weight, threshold.double(), tau))
    assert not native_gate.supports(
        (weight.view(3, 4).t(), threshold, tau)  # not contiguous
    )
    assert not native_gate.supports((weight, threshold, tau, torch.bfloat16))
    assert not native_gate.supports((weight.to("meta"), threshold, tau))
    monkeypatch.setenv(native_gate.SWITCH, "0")
    assert not native_gate.supports((weight, threshold, tau))


def test_fused_gate_picks_native_kernels_for_float32_cpu(monkeypatch):
    calls = []
    real_forward = native_gate.forward

    def counting_forward(*args):
        calls.append(args[0].dtype)
        return real_forward(*args)

    monkeypatch.setattr(native_gate, "forward", counting_forward)
    weight, threshold, tau, _, _ = gate_inputs(40)
    assert (
        fused_gate._kernels_for(weight, True) is fused_gate.native_cpu_kernels()
    )
    assert fused_gate._kernels_for(weight, False) is fused_gate.EAGER_KERNELS
    gated, _ = FusedPinchFunction.apply(weight, threshold, tau, True)
    assert calls == [torch.float32]
    # float64 goes to the torch.compile kernels, with the same numbers.
    gated64, _ = FusedPinchFunction.apply(
        weight.double(), threshold.double(), tau.double(), True
    )
    assert calls == [torch.float32]
    values_close(gated, gated64)
    monkeypatch.setenv(native_gate.SWITCH, "0")
    assert fused_gate._kernels_for(weight, True) is (
        fused_gate.compiled_kernels("cpu")
    )


def test_gradients_through_the_fused_function_match_the_reference():
    numel = 3000
    weight, threshold, tau, upstream, _ = gate_inputs(numel, seed=3)
    results = []
    for compiled in (True, False):  # native kernels, eager float64 truth
        dtype = torch.float32 if compiled else torch.float64
        w = weight.to(dtype, copy=True).requires_grad_()
        t = threshold.to(dtype, copy=True).requires_grad_()
        gated, zeros = FusedPinchFunction.apply(
            w, t, tau.to(dtype), compiled, None, False
        )
        ((gated * upstream.to(dtype)).sum() + 0.5 * zeros).backward()
        results.append((gated.detach(), zeros.detach(), w.grad, t.grad))
    (gated, zeros, w_grad, t_grad), truths = results
    values_close(gated, truths[0])
    mask_sum_close(zeros, truths[1], numel)
    values_close(w_grad, truths[2])
    factor = float(threshold) * (0.5 + float((upstream * weight).abs().max()))
    slope_sum_close(t_grad, truths[3], numel, tau, factor)


def test_build_is_cached_and_named_by_source(tmp_path):
    compiler = native_gate.find_compiler()
    first = native_gate.build(tmp_path, compiler)
    modified = first.stat().st_mtime_ns
    assert native_gate.build(tmp_path, compiler) == first
    assert first.stat().st_mtime_ns == modified
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    source = native_gate.SOURCE.read_text()
    assert native_gate.library_name(source, compiler) == first.name
    assert native_gate.library_name(source + "\n", compiler) != first.name


def failing_compiler(tmp_path):
    """A 'compiler' that prints an error and fails (its --version works)."""
    script = tmp_path / "broken-cc"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo "broken-cc 1.0"; exit 0; }\n'
        'echo "broken-cc: error: no AVX2 here" >&2\nexit 3\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_failed_build_says_which_compiler_and_why(tmp_path):
    compiler = failing_compiler(tmp_path)
    with pytest.raises(native_gate.NativeBuildError) as error:
        native_gate.build(tmp_path / "cache", compiler)
    message = str(error.value)
    assert compiler in message and "exit 3" in message
    assert "no AVX2 here" in message
    assert not list((tmp_path / "cache").glob("*.so*"))  # nothing half-built


def test_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(
        native_gate, "find_compiler", lambda: failing_compiler(tmp_path)
    )
    monkeypatch.setenv(native_gate.CACHE_VARIABLE, str(tmp_path / "cache"))
    with pytest.warns(
        UserWarning, match="(?s)could not be built.*torch.compile"
    ):
        assert native_gate.load.__wrapped__() is None


def test_unwritable_cache_builds_in_a_temporary_directory(
    tmp_path, monkeypatch
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(native_gate.CACHE_VARIABLE, str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert native_gate.cache_directory() == blocker / "cache"
    library = native_gate.load.__wrapped__()
    assert library is not None and hasattr(library, "spg_forward")
    (built,) = tmp_path.glob(f"speechbrain_spg-{os.getuid()}/native_gate_*.so")
    assert built.name == native_gate.library_name(
        native_gate.SOURCE.read_text(), native_gate.find_compiler()
    )


def test_built_library_is_readable_by_others_sharing_the_cache(tmp_path):
    built = native_gate.build(tmp_path, native_gate.find_compiler())
    mode = built.stat().st_mode & 0o777
    assert mode == 0o755 & ~native_gate._umask()  # mkstemp gave 0600


def test_no_home_directory_builds_in_the_fallback_directory(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv(native_gate.CACHE_VARIABLE, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(native_gate.Path, "home", staticmethod(no_home))
    assert native_gate.cache_directory() == native_gate.fallback_directory()


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(native_gate.CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_gate.cache_directory() == tmp_path / "speechbrain_spg"
    monkeypatch.setenv(native_gate.CACHE_VARIABLE, str(tmp_path / "x"))
    assert native_gate.cache_directory() == tmp_path / "x"
    assert os.fspath(native_gate.SOURCE).endswith("native_gate_kernels.c")


def test_library_without_the_kernels_warns_and_falls_back(
    tmp_path, monkeypatch
):
    source = tmp_path / "other.c"
    source.write_text("int not_a_gate_kernel;\n")
    monkeypatch.setattr(native_gate, "SOURCE", source)
    monkeypatch.setenv(native_gate.CACHE_VARIABLE, str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="AttributeError.*spg_forward"):
        assert native_gate.load.__wrapped__() is None


def test_a_compiled_caller_traces_the_gate_without_graph_breaks():
    # torch.compile cannot trace the C kernels (ctypes); under it the gate
    # uses the torch.compile kernels, so fullgraph=True works.
    def loss(w, t, tau):
        gated, zeros = FusedPinchFunction.apply(w, t, tau, True)
        return (gated * gated).sum() + zeros

    weight, threshold, tau, _, _ = gate_inputs(2048, seed=5)
    results = []
    for run in (loss, torch.compile(loss, fullgraph=True)):
        w = weight.clone().requires_grad_()
        t = threshold.clone().requires_grad_()
        value = run(w, t, tau)
        value.backward()
        results.append((value.detach(), w.grad, t.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
