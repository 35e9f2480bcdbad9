"""The fast gate paths compute what the reference path computes.

``gate_impl: fused`` (eager) and ``gate_impl: compiled`` (torch.compile) must
give the reference outputs and the reference gradients of the weights, the
thresholds and the multipliers, within float32 rounding, for a whole lobe
training step (task loss + sparsity loss).
"""

import functools
from unittest import mock

import pytest
import torch
from conftest import device_reads
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2

from speechbrain_spg import gates
from speechbrain_spg.fused_gate import (
    SIGMOID_SATURATION,
    FusedPinchFunction,
    _pinch_argument,
    compiled_kernels,
    flush_subnormal,
)
from speechbrain_spg.gates import (
    GatedLinear,
    PinchFunction,
    SelfPinchingGate,
    SoftZerosFunction,
)
from speechbrain_spg.lobes import SPGHuBERT, SPGWav2Vec2, SPGWavLM

#: CPU always; CUDA too where a GPU is present (not generated elsewhere).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recompute_mask", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_function_matches_reference_functions(
    compiled, recompute_mask, device
):
    torch.manual_seed(0)
    weight = torch.randn(64, 48, device=device) * 0.05
    threshold = torch.tensor(0.04, device=device)
    tau = torch.tensor(0.02 * 0.05**2, device=device)
    upstream = torch.randn(64, 48, device=device)

    def run(fused):
        w = weight.clone().requires_grad_()
        t = threshold.clone().requires_grad_()
        if fused:
            gated, zeros = FusedPinchFunction.apply(
                w, t, tau, compiled, recompute_mask
            )
        else:
            gated = PinchFunction.apply(w, t, tau)
            zeros = SoftZerosFunction.apply(w.detach(), t, tau)
        ((gated * upstream).sum() + 3.0 * zeros).backward()
        return gated.detach(), zeros.detach(), w.grad, t.grad

    tolerance = {"rtol": 1e-5, "atol": 1e-6}
    if device == "cuda" and compiled and not recompute_mask:
        # Seen on an H100: Triton's float32 division is not correctly
        # rounded, and near M = 1 the slope M (1 - M) magnifies the last
        # bit of the mask read back as (W M) / W (up to 5e-5 on gradients
        # of about 1). CUDA recomputes the mask by default.
        tolerance = {"rtol": 1e-4, "atol": 1e-4}
    for ref, fast in zip(run(False), run(True)):
        torch.testing.assert_close(fast, ref, **tolerance)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
def test_sigmoid_saturation_changes_no_mask_value(dtype):
    # Clipping the argument there is exact: the sigmoid is already 1.
    at = torch.tensor(SIGMOID_SATURATION, dtype=dtype)
    assert torch.sigmoid(at).item() == 1.0
    assert torch.sigmoid(at - 1).item() == 1.0


def test_sigmoid_saturation_is_a_constant_for_torch_compile():
    # A float global would be traced as a 0-d tensor read back with .item()
    # in every compiled call (seen on CUDA as 2 reads per gated matrix).
    assert type(SIGMOID_SATURATION) is int
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(_pinch_argument, backend=backend, dynamic=True)
    compiled(torch.ones(2, 3), torch.tensor(0.5), torch.tensor(0.25))
    assert len(graphs) == 1
    assert "item" not in graphs[0].code


def test_sigmoid_saturation_keeps_the_exponential_a_normal_number():
    # exp(-x) of every clipped argument is at least exp(-80), a normal
    # float32 number (exp(-88) would already be subnormal).
    smallest = torch.exp(torch.tensor(-float(SIGMOID_SATURATION)))
    assert smallest.item() >= torch.finfo(torch.float32).tiny
    weight = torch.tensor([0.0, 0.01, 1.0, 100.0])
    x = _pinch_argument(weight, torch.tensor(0.01), torch.tensor(1e-6))
    assert x.tolist() == [-50.0, 0.0, SIGMOID_SATURATION, SIGMOID_SATURATION]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("recompute_mask", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_weights_far_above_the_threshold_pass_unchanged(
    compiled, recompute_mask, dtype
):
    # (W^2 - t^2) / (2 tau) from 80 (the clip) to about 5000: M = 1
    # exactly, so W * M = W, M sums to the size, and the weight gradient
    # is the upstream gradient itself, as on the reference path.
    weight = torch.linspace(0.04, 0.3, 600, dtype=dtype).reshape(20, 30)
    threshold = torch.tensor(0.01, dtype=dtype, requires_grad=True)
    tau = torch.tensor(8e-6, dtype=dtype)
    upstream = torch.randn(20, 30, dtype=dtype)
    w = weight.clone().requires_grad_()
    gated, zeros = FusedPinchFunction.apply(
        w, threshold, tau, compiled, recompute_mask
    )
    (gated * upstream).sum().backward()
    assert torch.equal(gated.detach(), weight)
    assert zeros.item() == 0.0
    assert torch.equal(w.grad, upstream)
    assert threshold.grad.item() == 0.0


def _subnormal_case():
    """Weights whose gated value is subnormal on the reference path: at
    W = +-1e-5 the argument of the sigmoid is -79 (above the clip at -80),
    M = 4.9e-35 and W * M = 4.9e-40; 0.5 and 1.0 are far above t."""
    tau = torch.tensor(1e-3)
    threshold = torch.tensor((1e-10 + 2 * 79 * 1e-3) ** 0.5)
    weight = torch.tensor([1e-5, -1e-5, 0.5, 1.0] * 4)
    return weight, threshold, tau


@pytest.mark.parametrize("recompute_mask", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_fast_gate_returns_no_subnormal_gated_weight(compiled, recompute_mask):
    # A subnormal gated weight slows down every matrix product that reads
    # it on x86 CPUs (1.48x a trained tiny model's step); the fast paths
    # return 0 there, less than float32's smallest normal number away.
    weight, threshold, tau = _subnormal_case()
    tiny = torch.finfo(torch.float32).tiny
    reference = PinchFunction.apply(weight, threshold, tau)
    assert (reference[::4].abs() < tiny).all() and (reference[::4] != 0).all()
    w = weight.clone().requires_grad_()
    t = threshold.clone().requires_grad_()
    gated, zeros = FusedPinchFunction.apply(w, t, tau, compiled, recompute_mask)
    kept = weight.abs() > 0.1
    assert torch.equal(gated.detach()[~kept], torch.zeros(8))
    assert torch.equal(gated.detach()[kept], weight[kept])
    upstream = torch.linspace(-1.0, 1.0, weight.numel())
    ((gated * upstream).sum() + 2.0 * zeros).backward()
    w_ref = weight.clone().requires_grad_()
    t_ref = threshold.clone().requires_grad_()
    ref_zeros = SoftZerosFunction.apply(w_ref.detach(), t_ref, tau)
    ref_gated = PinchFunction.apply(w_ref, t_ref, tau)
    ((ref_gated * upstream).sum() + 2.0 * ref_zeros).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "compiled", "reference"])
def test_evaluation_gates_without_subnormals_on_the_fast_paths(
    impl, monkeypatch
):
    # Without gradients (validation, test, the eval cache) the fast
    # gates use their forward kernel too; the reference path does not
    # flush.
    weight, threshold, tau = _subnormal_case()
    gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5, impl=impl)
    monkeypatch.setattr(gate, "_threshold_and_tau", lambda i: (threshold, tau))
    with torch.no_grad():
        gated = gate(0, weight)
    assert torch.equal(gated[2::4], weight[2::4])
    if impl == "reference":
        assert (gated[::4] != 0).all()
    else:
        assert torch.equal(gated[::4], torch.zeros(4))


@pytest.mark.parametrize("compiled", [False, True])
def test_flushing_subnormals_keeps_nan(compiled):
    # A non-finite weight must stay visible (the recipe skips such steps).
    weight, threshold, tau = _subnormal_case()
    weight[2] = float("nan")
    gated, _ = FusedPinchFunction.apply(weight, threshold, tau, compiled, False)
    assert torch.isnan(gated[2]) and gated[0] == 0


def test_flush_subnormal_in_every_floating_dtype():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        tiny = torch.finfo(dtype).tiny
        x = torch.tensor([tiny / 4, -tiny / 2, tiny, -2.0, 0.0], dtype=dtype)
        assert flush_subnormal(x).tolist() == [0.0, 0.0, tiny, -2.0, 0.0]


def test_compiled_kernel_flushes_subnormals():
    # The torch.compile kernel (float64 weights and autocast casts go
    # there on CPU) does what the eager math does.
    weight, threshold, tau = _subnormal_case()
    gated, _ = compiled_kernels("cpu").forward(weight, threshold, tau)
    assert torch.equal(gated[::4], torch.zeros(4))
    assert torch.equal(gated[2::4], weight[2::4])


def _gate_inputs():
    torch.manual_seed(0)
    w = (torch.randn(16, 8) * 0.05).requires_grad_()
    t = torch.tensor(0.04, requires_grad=True)
    tau = torch.tensor(0.02 * 0.05**2)
    upstream = torch.randn(16, 8)
    (expected,) = torch.autograd.grad(
        PinchFunction.apply(w, t, tau), w, upstream
    )
    return w, t, tau, upstream, expected


@pytest.mark.parametrize("recompute_mask", [False, True])
def test_weight_gradient_reuses_the_incoming_buffer_on_request(recompute_mask):
    """With overwrite_grad the backward writes the weight gradient into the
    gradient autograd hands it (no new weight-sized tensor)."""
    w, t, tau, upstream, expected = _gate_inputs()
    seen = {}

    def keep(grad):
        seen["incoming"] = grad
        return grad

    gated, _ = FusedPinchFunction.apply(w, t, tau, False, recompute_mask, True)
    gated.register_hook(keep)
    (grad_w,) = torch.autograd.grad(gated, w, upstream.clone())
    assert grad_w.data_ptr() == seen["incoming"].data_ptr()
    torch.testing.assert_close(grad_w, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recompute_mask", [False, True])
def test_gradients_seen_by_user_code_are_left_alone(recompute_mask):
    """Without overwrite_grad (the default), gradients the caller can see
    stay intact: given grad_outputs, a second backward through a retained
    graph, and a gradient shared with another branch of the graph."""
    w, t, tau, upstream, expected = _gate_inputs()
    gated, _ = FusedPinchFunction.apply(w, t, tau, False, recompute_mask)
    given = upstream.clone()
    for _ in range(2):
        (grad_w,) = torch.autograd.grad(gated, w, given, retain_graph=True)
        torch.testing.assert_close(given, upstream)
        torch.testing.assert_close(grad_w, expected, rtol=1e-5, atol=1e-7)
    # gated + h: the addition hands both branches the same gradient tensor.
    h = torch.zeros(16, 8, requires_grad=True)
    gated, _ = FusedPinchFunction.apply(w, t, tau, False, recompute_mask)
    grad_w, grad_h = torch.autograd.grad(gated + h, (w, h), upstream)
    torch.testing.assert_close(grad_h, upstream)
    torch.testing.assert_close(grad_w, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [8e-6, 1e-3])
@pytest.mark.parametrize("compiled", [False, True])
def test_mask_read_back_from_gated_weight_at_zero_and_tiny_weights(
    compiled, tau
):
    """The CPU backward divides W * M by W; at W = 0, at weights so small
    that W * M underflows and at masks that underflow it must still give
    the gradients of the recomputed mask (within float32 rounding).

    tau 8e-6: the mask of 3e-3 underflows float32 (about 1e-43); tau 1e-3:
    the mask at W = 0 is sigmoid(-0.8) = 0.31, so the value taken there
    matters.
    """
    weight = torch.tensor(
        [0.0, -0.0, 1e-39, 1e-30, -1e-25, 1e-20, 3e-3, 0.02, -0.04, 0.05]
        + [0.3, -2.0]
    )
    threshold = torch.tensor(0.04)
    upstream = torch.linspace(-1.0, 1.0, weight.numel())

    def grads(recompute):
        w = weight.clone().requires_grad_()
        t = threshold.clone().requires_grad_()
        gated, zeros = FusedPinchFunction.apply(
            w, t, torch.tensor(tau), compiled, recompute
        )
        ((gated * upstream).sum() + 2.0 * zeros).backward()
        return w.grad, t.grad

    reference = grads(True)
    from_gated = grads(False)
    if tau == 1e-3:
        assert reference[0][:2].abs().min() > 0.1  # M(0) * upstream
    assert torch.isfinite(from_gated[0]).all()
    for fast, ref in zip(from_gated, reference):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_get_accurate_gradients(dtype):
    """16-bit weights take the recomputing backward by default: a mask read
    back from a 16-bit W * M would be off by 8% (bfloat16) to 70% (float16,
    whose smallest normal number, 6e-5, is the size of small weights)."""
    torch.manual_seed(0)
    weight = (torch.randn(64, 48) * 0.05).to(dtype)
    threshold = torch.tensor(0.05).to(dtype)
    tau = torch.tensor(0.05 * 0.05**2).to(dtype)
    upstream = torch.randn(64, 48, dtype=torch.float64)
    # Exact gradient at the same (rounded) numbers, in float64.
    w = weight.double().requires_grad_()
    gated = PinchFunction.apply(w, threshold.double(), tau.double())
    (gated * upstream).sum().backward()
    exact = w.grad
    w = weight.clone().requires_grad_()
    gated, _ = FusedPinchFunction.apply(w, threshold, tau, True)
    (gated.double() * upstream).sum().backward()
    error = (w.grad.double() - exact).abs()
    # Compiled kernels compute in float32; the result is rounded to dtype.
    assert (error <= 0.02 * exact.abs() + 1e-3 * exact.abs().max()).all()


def record(saved, tensor):
    """Pack hook: notes a tensor autograd saves."""
    saved.append(tensor)
    return tensor


def test_gated_linear_keeps_no_gated_weight_when_its_input_needs_no_grad():
    """F.linear keeps the gated weight only when its input needs a
    gradient; otherwise the backward recomputes the mask rather than keep
    W * M alive just to read the mask back."""
    layer = torch.nn.Linear(48, 64)
    gate = SelfPinchingGate(
        layer.weight.detach().std().reshape(1), [0], 0.05, 0.5, impl="fused"
    )
    gated = GatedLinear(layer, gate, 0)
    sizes = {}
    for needs_grad in (True, False):
        saved = []
        x = torch.randn(3, 48, requires_grad=needs_grad)
        with torch.autograd.graph.saved_tensors_hooks(
            functools.partial(record, saved), lambda t: t
        ):
            out = gated(x)
        weight_sized = {
            t.untyped_storage().data_ptr()
            for t in saved
            if t.numel() == layer.weight.numel()
        }
        sizes[needs_grad] = len(weight_sized)
        out.sum().backward()
        assert layer.weight.grad is not None
        layer.weight.grad = None
    # W and W * M (shared by the product and the gate) / W only.
    assert sizes == {True: 2, False: 1}


def test_fused_backward_refuses_double_backward():
    """The fused backward is not differentiable: asking for a second-order
    gradient fails loudly instead of returning wrong numbers."""
    w, t, tau, upstream, _ = _gate_inputs()
    gated, zeros = FusedPinchFunction.apply(w, t, tau)
    (grad_t,) = torch.autograd.grad(
        (gated * upstream).sum() + zeros, t, create_graph=True
    )
    with pytest.raises(RuntimeError, match="does not require grad|once_diff"):
        grad_t.backward()


def lobe_step(
    source,
    impl,
    layerdrop=0.0,
    seed=1,
    dtype=None,
    device="cpu",
    lobe_class=SPGWav2Vec2,
    per_block=False,
    **options,
):
    """One training step of a tiny lobe; returns outputs and gradients.

    Also returns how many matrices the forward pass gated on the fused
    path (all 12 unless LayerDrop skipped a block). ``per_block`` gates a
    block's matrices in one call (``gates.pregated_weights``), one by one
    otherwise, whatever the device's default.
    """
    torch.manual_seed(0)
    lobe = lobe_class(
        source,
        save_path="",
        target_sparsity=0.5,
        threshold_init=0.6,
        gate_impl=impl,
        **options,
    )
    lobe.model.config.layerdrop = layerdrop
    lobe.to(device).train()
    lobe.gate.step += 5
    lobe.regularizer.multiplier_param.data.fill_(0.3)
    torch.manual_seed(seed)
    wav = torch.randn(2, 4000).to(device)
    for module in lobe.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with (
        mock.patch.object(gates, "default_pregating", lambda w: per_block),
        torch.autocast(device, dtype=dtype, enabled=dtype is not None),
    ):
        out = lobe(wav)
    recorded = len(lobe.gate.soft_zeros)
    sparsity_loss = lobe.sparsity_loss()
    (out.float().pow(2).mean() + sparsity_loss).backward()
    grads = {
        name: p.grad.clone()
        for name, p in lobe.named_parameters()
        if p.grad is not None
    }
    return out.detach(), sparsity_loss.detach(), grads, recorded


def assert_same_step(step, reference, **out_tolerance):
    """Output, loss and every gradient of a ``lobe_step`` equal the
    reference step's (output within 1e-5 unless ``out_tolerance`` says
    otherwise)."""
    out, loss, grads, _ = step
    ref_out, ref_loss, ref_grads, _ = reference
    tolerance = out_tolerance or {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, ref_out, **tolerance)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name
        )


@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_lobe_step_matches_reference(wav2vec2_source, impl, device, per_block):
    reference = lobe_step(wav2vec2_source, "reference", device=device)
    step = lobe_step(wav2vec2_source, impl, device=device, per_block=per_block)
    assert step[3] == 12
    assert_same_step(step, reference)
    assert "gate.threshold_param" in step[2]
    assert "regularizer.multiplier_param" in step[2]


def test_lobe_step_gating_all_matrices_in_one_call_matches_reference(
    wav2vec2_source,
):
    """One gate call for all matrices (the default with the Triton kernels
    on one GPU; forced here on CPU with the eager batch kernels): the same
    step, and the sparsity term takes the call's counts whole."""
    reference = lobe_step(wav2vec2_source, "reference")
    calls = []
    whole = gates.SelfPinchingGate.recorded_soft_zero_vector

    def recording(gate, count):
        calls.append(whole(gate, count))
        return calls[-1]

    with (
        mock.patch.object(gates, "matrices_per_call", lambda g, layers: 12),
        mock.patch.object(
            gates.SelfPinchingGate, "recorded_soft_zero_vector", recording
        ),
    ):
        step = lobe_step(wav2vec2_source, "fused", per_block=True)
    assert step[3] == 12
    assert_same_step(step, reference)
    assert len(calls) == 1 and calls[0].shape == (12,)


@pytest.mark.parametrize("per_block", [False, True])
def test_lobe_step_recomputing_gated_weights_matches_reference(
    wav2vec2_source, per_block
):
    """``recompute_gated_weights``: the lobe's step (with LayerDrop) gives
    the reference numbers."""
    reference = lobe_step(wav2vec2_source, "reference", layerdrop=0.5, seed=3)
    step = lobe_step(
        wav2vec2_source,
        "compiled",
        layerdrop=0.5,
        seed=3,
        per_block=per_block,
        recompute_gated_weights=True,
    )
    assert_same_step(step, reference)


@pytest.mark.parametrize("per_block", [False, True])
def test_lobe_training_step_reads_back_no_more_than_the_dense_lobe(
    wav2vec2_source, per_block
):
    """A training step of the SPG lobe (forward, sparsity loss, backward)
    reads no value back from the device beyond what the dense model
    does: no step counter, no pruned flag, no threshold (each would stall
    a GPU step)."""
    torch.manual_seed(0)
    dense = Wav2Vec2(wav2vec2_source, save_path="")
    spg = SPGWav2Vec2(
        wav2vec2_source,
        save_path="",
        target_sparsity=0.5,
        gate_impl="compiled",
    )
    wav = torch.randn(2, 4000)

    def step(lobe):
        def run():
            out = lobe(wav).pow(2).mean()
            if lobe is spg:
                out = out + lobe.sparsity_loss()
            out.backward()

        return run

    reads = {}
    with mock.patch.object(gates, "default_pregating", lambda w: per_block):
        for name, lobe in (("dense", dense), ("spg", spg)):
            lobe.model.config.layerdrop = 0.0
            lobe.train()
            step(lobe)()  # compiles the kernels first
            reads[name] = device_reads(step(lobe))
    assert reads["spg"] == reads["dense"]
    assert spg.gate.step_count == 2


def test_per_matrix_training_reuses_the_probe_compiled_kernels():
    """compiled_kernels compiles each kernel once, for every weight shape:
    training gated layers one by one (square, wide and tall matrices)
    compiles nothing more."""
    from torch._dynamo.utils import counters

    compiled_kernels("cpu")
    before = counters["stats"]["unique_graphs"]
    torch.manual_seed(3)
    shapes = [(6, 6), (4, 9), (9, 4)]
    layers = [torch.nn.Linear(n_in, n_out) for n_out, n_in in shapes]
    scales = torch.stack([layer.weight.detach().std() for layer in layers])
    gate = SelfPinchingGate(scales, [0, 1, 2], 0.05, 0.5, impl="compiled")
    for _ in range(2):
        loss = 0
        for i, layer in enumerate(layers):
            x = torch.randn(2, layer.in_features, requires_grad=True)
            loss = loss + GatedLinear(layer, gate, i)(x).sum()
        loss.backward()
    assert counters["stats"]["unique_graphs"] == before


def test_lobe_training_compiles_once_per_model(wav2vec2_source):
    """The first compiled training step of a lobe compiles its batch
    kernels; a later step of another lobe of the same model, on other
    data, compiles nothing (no per-step or per-instance recompiles)."""
    from torch._dynamo.utils import counters

    lobe_step(wav2vec2_source, "compiled", per_block=True)
    before = counters["stats"]["unique_graphs"]
    lobe_step(wav2vec2_source, "compiled", seed=2, per_block=True)
    assert counters["stats"]["unique_graphs"] == before


def _skipped_blocks(grads):
    """Transformer blocks none of whose weights got a gradient."""
    return {
        block
        for block in ("0", "1")
        if not any(f"encoder.layers.{block}." in name for name in grads)
    }


@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_layerdrop_skipped_block_still_counts_in_the_sparsity_loss(
    wav2vec2_source, impl, per_block
):
    """With LayerDrop skipping a block, the fused paths (which gate a block's
    matrices in one call, on first use) give the reference results: the
    skipped block's weights get no gradient at all (not a zero one, which
    Adam would use), and its matrices still count in the sparsity loss and
    the threshold gradients."""
    for seed in range(20):  # a seed where LayerDrop skips one of 2 blocks
        ref_out, ref_loss, ref_grads, _ = lobe_step(
            wav2vec2_source, "reference", layerdrop=0.5, seed=seed
        )
        if len(_skipped_blocks(ref_grads)) == 1:
            break
    assert len(_skipped_blocks(ref_grads)) == 1, "no seed in 0..19 skipped one"
    out, loss, grads, recorded = lobe_step(
        wav2vec2_source, impl, layerdrop=0.5, seed=seed, per_block=per_block
    )
    # The skipped block's chunk was never gated: its counts come from the
    # separate soft-zeros pass.
    assert recorded == 6
    assert_same_step(
        (out, loss, grads, recorded), (ref_out, ref_loss, ref_grads, None)
    )


def test_layerdrop_with_all_matrices_in_one_call_matches_reference(
    wav2vec2_source,
):
    """One gate call for all matrices (the default with the Triton kernels
    on one GPU; forced here on CPU) gates a block that LayerDrop then skips:
    its weights get no gradient, its counts are recorded (12, not 6) and
    the step equals the reference one."""
    for seed in range(20):  # a seed where LayerDrop skips one of 2 blocks
        reference = lobe_step(
            wav2vec2_source, "reference", layerdrop=0.5, seed=seed
        )
        if len(_skipped_blocks(reference[2])) == 1:
            break
    assert len(_skipped_blocks(reference[2])) == 1, "no seed skipped one"
    with mock.patch.object(gates, "matrices_per_call", lambda g, layers: 12):
        step = lobe_step(
            wav2vec2_source, "fused", layerdrop=0.5, seed=seed, per_block=True
        )
    assert step[3] == 12
    assert _skipped_blocks(step[2]) == _skipped_blocks(reference[2])
    assert_same_step(step, reference)


@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_bfloat16_autocast_step_matches_reference(
    wav2vec2_source, impl, device, per_block
):
    """Under bf16 autocast the gate computes in float32 and casts its output
    to bf16 in the same kernel (the reference path lets the matmul cast
    it): the same numbers, so both paths agree as in float32."""
    dtype = torch.bfloat16
    ref_out, ref_loss, ref_grads, _ = lobe_step(
        wav2vec2_source, "reference", dtype=dtype, device=device
    )
    out, loss, grads, recorded = lobe_step(
        wav2vec2_source, impl, dtype=dtype, device=device, per_block=per_block
    )
    # The lobe's output dtype follows autocast's rules for its last layer
    # (bf16 on CPU, float32 on CUDA): the same as the reference path's.
    assert out.dtype == ref_out.dtype and recorded == 12
    assert all(g.dtype == torch.float32 for g in grads.values())
    # The output's tolerance: assert_close's default for its dtype.
    assert_same_step(
        (out, loss, grads, recorded),
        (ref_out, ref_loss, ref_grads, None),
        rtol=None,
        atol=None,
    )


def _origin(tensor):
    """Name of the autograd node that made ``tensor``, looking through a
    transpose (the matrix product saves the weight transposed)."""
    node = tensor.grad_fn
    if node is not None and node.name() == "TBackward0":
        node = node.next_functions[0][0]
    return node.name() if node is not None else None


def _autocast_layer_step(impl, device):
    """A GatedLinear step under bf16 autocast: output, weight and threshold
    gradients, and (dtype, maker) of the weight the matrix product saved."""
    torch.manual_seed(12)
    layer = torch.nn.Linear(6, 5).to(device)
    gate = SelfPinchingGate(
        layer.weight.detach().std().reshape(1), [0], 0.05, 0.5, impl=impl
    ).to(device)
    gated = GatedLinear(layer, gate, 0)
    x = torch.randn(3, 6, device=device, requires_grad=True)
    saved = []

    def pack(tensor):
        if tensor.shape == (6, 5):  # the weight, as the product saves it
            saved.append((tensor.dtype, _origin(tensor)))
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(device, dtype=torch.bfloat16),
    ):
        y = gated(x)
    y.float().pow(2).sum().backward()
    return (y, layer.weight.grad, gate.threshold_param.grad), saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_gate_casts_to_the_autocast_dtype_in_its_own_kernel(impl, device):
    """Under autocast the matrix product gets the gated weight in bf16 from
    the gate itself (no separate cast pass of a float32 copy), and the
    results equal the reference path's, whose float32 output the product
    casts."""
    expected, saved = _autocast_layer_step("reference", device)
    assert saved == [(torch.bfloat16, "ToCopyBackward0")]
    actual, saved = _autocast_layer_step(impl, device)
    assert saved == [(torch.bfloat16, "FusedPinchFunctionBackward")]
    for value, reference in zip(actual, expected):
        assert value.dtype == reference.dtype
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["hubert", "wavlm"])
def test_hubert_and_wavlm_steps_match_reference(
    tiny_sources, model_type, dtype
):
    """The all-at-once compiled gate also serves HuBERT and WavLM (whose
    attention reads the gated weights through ``effective_weights``), in
    float32 and under bf16 autocast."""
    lobe_class = {"hubert": SPGHuBERT, "wavlm": SPGWavLM}[model_type]
    source = tiny_sources[model_type]
    reference = lobe_step(
        source, "reference", dtype=dtype, lobe_class=lobe_class
    )
    step = lobe_step(
        source, "compiled", dtype=dtype, lobe_class=lobe_class, per_block=True
    )
    assert step[3] == 12 and step[0].dtype == reference[0].dtype
    assert_same_step(step, reference)
