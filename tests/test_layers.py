"""Gated layers (``speechbrain_spg.layers``) and the lobes' training steps.

``SelfPinchingGate`` (thresholds of the tie groups, step counter, pruned
flag), ``GatedLinear`` (eval cache, autocast, ``recompute_gated``,
``pregated_weights``, pruned weights) and, at the end, whole training
steps of the tiny lobes with the ``fused`` and ``compiled`` gates against
the ``reference`` gate (outputs, sparsity loss, every gradient), in
float32 and under bf16 autocast, with LayerDrop, per matrix, per block
and in one call.
"""

import contextlib
import functools
import weakref
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from torch import nn

from conftest import device_reads
from speechbrain_spg import layers
from speechbrain_spg.gate import gated_weight
from speechbrain_spg.kernels import chunks
from speechbrain_spg.kernels import triton as triton_backend
from speechbrain_spg.kernels.chunks import (
    MATRICES_PER_CALL,
    matrices_per_call,
    pregated_weights,
)
from speechbrain_spg.layers import (
    MIN_SCALE,
    GatedLinear,
    HostValue,
    SelfPinchingGate,
    group_indices,
)
from speechbrain_spg.lobes import SPGHuBERT, SPGWav2Vec2, SPGWavLM

#: CPU always; CUDA too where a GPU is present (not generated elsewhere).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gated_linear(seed=0, in_features=8, out_features=4, threshold=0.5):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    gate = SelfPinchingGate(
        layer.weight.detach().std().reshape(1), [0], 0.05, threshold
    )
    return GatedLinear(layer, gate, 0), gate


def test_gate_defaults_to_the_fused_backend():
    gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5)
    assert gate.impl == "fused" and gate.recompute_gated is False
    weight = torch.tensor([0.1, 2.0], requires_grad=True)
    gated = gate(0, weight)
    assert gated.grad_fn.name() == "GateFunctionBackward"
    torch.testing.assert_close(
        gated, gated_weight(weight, torch.tensor(0.5), 0.05)
    )


def test_gate_groups_and_thresholds():
    scales = torch.tensor([1.0, 2.0, 4.0])
    gate = SelfPinchingGate(scales, [0, 0, 1], 0.05, 0.5, lr_scale=10.0)
    assert gate.num_groups == 2
    assert torch.allclose(gate.threshold_param, torch.tensor([0.05, 0.05]))
    assert torch.allclose(gate.thresholds(), torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(gate.taus(), torch.tensor([0.05, 0.2, 0.8]))
    # One Adam step (of size lr) moves the threshold by lr * lr_scale.
    optimizer = torch.optim.Adam([gate.threshold_param], lr=0.01)
    gate.group_thresholds().sum().backward()
    optimizer.step()
    assert torch.allclose(
        gate.group_thresholds().detach(), torch.tensor([0.4, 0.4])
    )


def test_gate_state_dict_keys():
    gate = SelfPinchingGate(torch.ones(3), [0, 0, 1], 0.05, 0.5)
    assert set(gate.state_dict()) == {
        "threshold_param",
        "scale",
        "group",
        "pruned",
        "step",
    }
    assert [name for name, _ in gate.named_parameters()] == ["threshold_param"]


def test_group_indices_modes_and_errors():
    names = [
        "encoder.layers.0.attention.q_proj",
        "encoder.layers.0.feed_forward.output_dense",
        "encoder.layers.1.attention.q_proj",
        "encoder.layers.10.attention.q_proj",
    ]
    assert group_indices(names, "linear") == [0, 1, 2, 3]
    assert group_indices(names, "block") == [0, 0, 1, 2]
    assert group_indices(names, "global") == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"^tie: unknown tie mode 'layer'"):
        group_indices(names, "layer")
    with pytest.raises(
        ValueError, match=r"cannot find the transformer block of module 'proj'"
    ):
        group_indices(["proj"], "block")


def test_tiny_scales_are_raised_to_min_scale():
    """A matrix of only zeros (a layer pruned entirely before) would give
    tau = 0 and a gate of 0 / 0; with the floor its weights are pinched
    and every output and gradient is finite."""
    gate = SelfPinchingGate(torch.tensor([0.0, 1e-9, 0.5]), [0, 1, 2], 0.05, 1)
    assert gate.scale.tolist() == pytest.approx([MIN_SCALE, MIN_SCALE, 0.5])
    assert (gate.taus() > 0).all()
    layer = GatedLinear(nn.Linear(4, 3), gate, 0)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(2, 4, requires_grad=True)
    out = layer(x)
    (out.sum() + gate.soft_zeros[0]).backward()
    assert torch.equal(out, layer.bias.expand(2, 3))
    assert torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(gate.threshold_param.grad).all()
    # All 12 weights are pinched: the soft-zero count is 12.
    assert gate.soft_zeros[0].item() == pytest.approx(12.0, abs=1e-3)


def test_gated_linear_shares_parameters_and_state_dict_keys():
    torch.manual_seed(8)
    layer = nn.Linear(6, 3)
    keys = set(layer.state_dict())
    gate = SelfPinchingGate(
        layer.weight.detach().std().reshape(1), [0], 0.05, 0.5
    )
    gated = GatedLinear(layer, gate, 0)
    assert gated.weight is layer.weight and gated.bias is layer.bias
    assert set(gated.state_dict()) == keys
    # The gate is not a submodule of the layer.
    assert list(gated.children()) == [] and gated.gate is gate
    assert "gate_index=0" in repr(gated)


def test_pruned_weights_are_saved_as_zeros():
    """After hard pruning an optimiser's momentum can move the stored
    weights at pruned positions; the forward pass masks them, and the saved
    weight carries exact zeros there (the mask is rebuilt from them)."""
    gated, _ = _gated_linear(seed=1, in_features=6, out_features=5)
    before = gated.weight.detach().clone()
    mask = gated.weight.detach().abs() > 0.2
    assert 0 < mask.sum() < mask.numel()
    gated.mask = mask
    with torch.no_grad():
        gated.weight.add_(0.01)  # momentum, also at pruned positions
    x = torch.randn(3, 6)
    expected = F.linear(x, gated.weight * mask, gated.bias)
    torch.testing.assert_close(gated(x), expected)
    saved = gated.state_dict()["weight"]
    assert torch.equal(saved[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(saved[mask], (before + 0.01)[mask])
    # The layer's own weight is left alone; the mask is not saved.
    assert torch.equal(gated.weight.detach(), before + 0.01)
    assert "mask" not in gated.state_dict()
    gated.mask = None
    assert torch.equal(gated.state_dict()["weight"], before + 0.01)


def _fresh_output(gated, x):
    """Output computed from scratch, bypassing the eval cache."""
    with torch.no_grad():
        return F.linear(x, gated.effective_weight(), gated.bias)


def test_eval_cache_invalidated_when_weight_or_threshold_changes():
    gated, gate = _gated_linear(seed=9, in_features=12, out_features=6)
    x = torch.randn(4, 12)
    gated.eval()
    with torch.no_grad():
        first = gated(x)
        assert gated._cache is not None
        cached = gated._cache[1]
        again = gated(x)
    assert gated._cache[1] is cached  # served from the cache
    assert torch.equal(first, again)

    # In-place weight change (what an optimiser step does).
    with torch.no_grad():
        gated.weight.mul_(1.5)
        after_weight = gated(x)
    assert not torch.equal(after_weight, first)
    assert torch.allclose(after_weight, _fresh_output(gated, x), atol=1e-6)

    # Threshold change through an optimiser step.
    optimizer = torch.optim.SGD([gate.threshold_param], lr=0.5)
    gate.threshold_param.grad = torch.ones_like(gate.threshold_param)
    optimizer.step()
    with torch.no_grad():
        after_threshold = gated(x)
    assert not torch.equal(after_threshold, after_weight)
    assert torch.allclose(after_threshold, _fresh_output(gated, x), atol=1e-6)

    # Weight replaced through load_state_dict.
    state = {k: v.clone() for k, v in gated.state_dict().items()}
    state["weight"] = torch.randn_like(state["weight"])
    gated.load_state_dict(state)
    with torch.no_grad():
        after_load = gated(x)
    assert torch.allclose(after_load, _fresh_output(gated, x), atol=1e-6)
    assert not torch.allclose(after_load, after_threshold, atol=1e-3)


def test_eval_cache_under_autocast_holds_the_cast_weight():
    """Under autocast the cache keeps the gated weight in the autocast
    dtype (the product then casts nothing per pass); the same numbers as
    casting a fresh float32 gated weight, and a separate entry from the
    float32 one outside autocast."""
    gated, _ = _gated_linear(seed=13, in_features=12, out_features=6)
    x = torch.randn(4, 12)
    gated.eval()
    with torch.no_grad():
        outside = gated(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = gated(x)
            assert gated._cache[1].dtype == torch.bfloat16
            expected = F.linear(
                x.bfloat16(),
                gated.effective_weight().bfloat16(),
                gated.bias.bfloat16(),
            )
        assert torch.equal(inside, expected)
        assert torch.equal(gated(x), outside)
        assert gated._cache[1].dtype == torch.float32


def test_no_cache_in_training_or_with_gradients():
    gated, _ = _gated_linear(seed=10)
    x = torch.randn(3, 8)
    gated.train()
    with torch.no_grad():
        gated(x)
    assert gated._cache is None
    gated.eval()
    y = gated(x)
    assert gated._cache is None and y.requires_grad


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_gated_linear_under_bfloat16_autocast(impl):
    gated, gate = _gated_linear(seed=7, in_features=16, out_features=8)
    gate.impl = impl
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gated(x)
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    y.float().pow(2).sum().backward()
    grad = gate.threshold_param.grad
    assert grad is not None and grad.dtype == torch.float32
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(gated.weight.grad).all()
    # Close to the float32 result (bfloat16 keeps about 3 significant digits).
    with torch.no_grad():
        reference = F.linear(x, gated.effective_weight(), gated.bias)
    assert torch.allclose(y.float(), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "fused", "compiled"])
def test_gating_reads_nothing_back_from_the_device(impl, device):
    """Gating a matrix forward and backward needs no device read-back: on
    a GPU one per gated matrix would stall the host every layer."""
    torch.manual_seed(11)
    linears = [nn.Linear(6, 5).to(device) for _ in range(4)]
    scales = torch.stack([layer.weight.detach().std() for layer in linears])
    gate = SelfPinchingGate(scales, [0, 1, 1, 2], 0.05, 0.5, impl=impl)
    gate.to(device)
    gated = [GatedLinear(layer, gate, i) for i, layer in enumerate(linears)]
    x = torch.randn(3, 6, device=device, requires_grad=True)

    def step():
        sum(layer(x).sum() for layer in gated).backward()

    step()  # compiles the kernels of the compiled path first
    assert device_reads(step) == 0
    assert gate.threshold_param.grad.abs().min() > 0


def test_host_value_reads_back_only_after_a_change():
    step, value = torch.tensor(3), HostValue()
    assert device_reads(lambda: value.read(step)) == 1
    assert value.read(step) == 3
    assert device_reads(lambda: value.read(step)) == 0
    step += 2  # written in place: read back once more
    assert device_reads(lambda: value.read(step)) == 1
    assert value.read(step) == 5
    step.fill_(7)
    value.wrote(step, 7)  # the writer knows the value: no read-back
    assert device_reads(lambda: value.read(step)) == 0
    assert value.read(step) == 7
    other = torch.tensor(7)  # another tensor, same value
    other.add_(1)
    assert value.read(other) == 8
    with torch.inference_mode():
        frozen = torch.tensor(4)
    # No version counter: read back every time.
    assert device_reads(lambda: value.read(frozen)) == 1
    assert device_reads(lambda: value.read(frozen)) == 1
    value.wrote(frozen, 4)
    assert value.read(frozen) == 4


def test_step_count_and_pruned_flag_follow_their_buffers():
    """The gate keeps ``step`` and ``pruned`` as Python values: ``advance``
    needs no read-back, and any other write to the buffers (in place, a
    loaded state dict, a new tensor) is seen on the next read."""
    gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5)
    assert gate.step_count == 0 and not gate.is_pruned
    assert device_reads(lambda: [gate.advance() for _ in range(3)]) == 0
    assert gate.step_count == 3 and int(gate.step) == 3
    gate.step += 4  # written behind the gate's back
    assert gate.step_count == 7
    gate.advance(-2)
    assert gate.step_count == 5 and int(gate.step) == 5
    gate.pruned.fill_(True)
    assert gate.is_pruned
    state = gate.state_dict()
    state["step"], state["pruned"] = torch.tensor(40), torch.tensor(False)
    gate.load_state_dict(state)
    assert gate.step_count == 40 and not gate.is_pruned
    gate.step = torch.tensor(9)  # a new tensor
    assert gate.step_count == 9
    # Values seen once are not read back again.
    assert device_reads(lambda: (gate.step_count, gate.is_pruned)) == 0


def test_gated_layer_made_in_inference_mode_evaluates_without_a_cache():
    """Tensors made under torch.inference_mode have no version counter to
    tell a change: such a layer evaluates, gate flags read, no cache."""
    with torch.inference_mode():
        layer = nn.Linear(3, 2)
        gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5)
        gated = GatedLinear(layer, gate, 0).eval()
        x = torch.randn(4, 3)
        expected = F.linear(x, gate(0, layer.weight), layer.bias)
        torch.testing.assert_close(gated(x), expected)
        assert gated._cache is None
        gate.advance()
        assert gate.step_count == 1 and not gate.is_pruned


def test_group_of_each_matrix_follows_a_loaded_state_dict():
    """The gate indexes thresholds with a Python copy of its ``group``
    buffer; loading a state dict with other groups updates that copy."""
    weight = torch.tensor([[0.1, 2.0]])
    gate = SelfPinchingGate(torch.ones(2), [0, 1], 0.05, 0.5)
    state = gate.state_dict()
    state["threshold_param"] = torch.tensor([0.5, 1.5])
    state["group"] = torch.tensor([1, 0])
    gate.load_state_dict(state)
    for index in range(2):
        expected = gate.thresholds()[index]
        assert expected == 1.5 - index
        torch.testing.assert_close(
            gate(index, weight),
            gated_weight(weight, expected, gate.taus()[index]),
        )


@pytest.mark.parametrize("impl", ["reference", "fused", "compiled"])
def test_forward_records_soft_zeros_with_gradients_only(impl):
    gate = SelfPinchingGate(torch.ones(2), [0, 1], 0.005, 0.5, impl=impl)
    weight = torch.tensor([[0.1, 2.0], [0.0, -3.0]])
    with torch.no_grad():
        gate(0, weight)
    assert len(gate.soft_zeros) == 0
    gate(1, weight)
    assert sorted(gate.soft_zeros) == [1]
    # Two weights far below the threshold (0.1 and 0), two far above.
    assert gate.soft_zeros[1].item() == pytest.approx(2.0, abs=1e-3)
    assert gate.soft_zeros[1].requires_grad
    assert gate.recorded_soft_zeros(2) == {1: gate.soft_zeros[1]}
    assert gate.recorded_soft_zero_vector(2) is None


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_forward_many_gates_consecutive_matrices_in_one_call(impl):
    """``forward_many`` gives each matrix what ``forward`` gives it, records
    every count, and the call's count vector for ``recorded_soft_zero_vector``
    (when it covers the whole gate)."""
    torch.manual_seed(2)
    weights = [torch.randn(4, 3) * 0.5, torch.randn(2, 5) * 0.5]
    gate = SelfPinchingGate(
        torch.tensor([0.5, 0.4, 0.6]), [0, 1, 1], 0.05, 0.8, impl=impl
    )
    gated = gate.forward_many(1, weights)
    assert sorted(gate.soft_zeros) == [1, 2]
    assert gate.recorded_soft_zero_vector(3) is None
    for i, (w, g) in enumerate(zip(weights, gated), start=1):
        threshold, tau = gate.thresholds()[i], gate.taus()[i]
        torch.testing.assert_close(g, gated_weight(w, threshold, tau))
        torch.testing.assert_close(
            gate.soft_zeros[i], (1 - g / w).sum(), rtol=1e-5, atol=1e-5
        )
    gate.soft_zeros.clear()
    everything = [torch.randn(2, 2)] + weights
    gate.forward_many(0, everything, torch.bfloat16)
    vector = gate.recorded_soft_zero_vector(3)
    assert vector.shape == (3,) and vector.requires_grad
    assert torch.equal(
        vector.detach(),
        torch.stack([gate.soft_zeros[i] for i in range(3)]).detach(),
    )
    gate.soft_zeros.clear()
    assert gate.recorded_soft_zero_vector(3) is None


@pytest.mark.parametrize("impl", ["reference", "fused", "compiled"])
def test_regate_gives_the_forward_value(impl):
    gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5, impl=impl)
    torch.manual_seed(3)
    weight = torch.randn(5, 4, requires_grad=True)
    again = gate.regate(0, weight)
    assert not again.requires_grad
    assert torch.equal(again, gate(0, weight).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = gate.regate(0, weight, torch.bfloat16)
        assert torch.equal(half, gate(0, weight, out_dtype=torch.bfloat16))


def _subnormal_case():
    """At W = +-1e-5 the sigmoid's argument is -79: W * M = 4.9e-40, a
    subnormal float32 number; 0.5 and 1.0 are far above the threshold."""
    tau = torch.tensor(1e-3)
    threshold = torch.tensor((1e-10 + 2 * 79 * 1e-3) ** 0.5)
    weight = torch.tensor([[1e-5, -1e-5, 0.5, 1.0]] * 4)
    return weight, threshold, tau


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
    assert torch.equal(gated[:, 2:], weight[:, 2:])
    if impl == "reference":
        assert (gated[:, :2] != 0).all()
    else:
        assert torch.equal(gated[:, :2], torch.zeros(4, 2))


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


#: Features through a chain of six gated layers (one block's worth: one
#: call per block is what the compiled kernels compile for anyway).
CHAIN = [6, 5, 4, 5, 6, 5, 4]


def _gated_layer_step(impl, recompute, per_block=False, dtype=None):
    """One training step of a chain of six gated layers (3-D input, one
    call for all when ``per_block``); returns output, gradients and whether
    the gated weights were still alive after the forward pass."""
    torch.manual_seed(21)
    linears = [nn.Linear(a, b) for a, b in zip(CHAIN, CHAIN[1:])]
    scales = torch.stack([layer.weight.detach().std() for layer in linears])
    gate = SelfPinchingGate(
        scales,
        [0, 1, 2, 0, 1, 2],
        0.05,
        0.8,
        impl=impl,
        recompute_gated=recompute,
    )
    gated_layers = [
        GatedLinear(layer, gate, i) for i, layer in enumerate(linears)
    ]
    x = torch.randn(2, 3, 6, requires_grad=True)
    alive = []
    gate_with_autograd = layers.gate_matrices

    def watched(*args, **kwargs):
        zeros, gated = gate_with_autograd(*args, **kwargs)
        alive.extend(weakref.ref(weight) for weight in gated)
        return zeros, gated

    context = (
        pregated_weights(gate, gated_layers, enabled=True)
        if per_block
        else contextlib.nullcontext()
    )
    with (
        mock.patch.object(layers, "gate_matrices", watched),
        torch.autocast("cpu", dtype=dtype, enabled=dtype is not None),
        context,
    ):
        out = x
        for layer in gated_layers:
            out = layer(out)
    kept = [ref() is not None for ref in alive]
    zeros = sum(gate.recorded_soft_zeros(6).values())
    (out.float().pow(2).sum() + 1e-3 * zeros).backward()
    grads = [x.grad] + [p.grad for layer in linears for p in layer.parameters()]
    return out.detach(), grads + [gate.threshold_param.grad], kept


@pytest.mark.parametrize(
    "impl, per_block, dtype",
    [
        ("reference", False, None),
        ("fused", False, None),
        ("compiled", False, None),
        ("compiled", True, None),
        ("compiled", False, torch.bfloat16),
        ("fused", True, torch.bfloat16),
    ],
)
def test_recompute_gated_keeps_no_gated_weight_and_matches(
    impl, per_block, dtype
):
    """With ``recompute_gated`` no gated weight survives the forward pass
    (the matrix product's backward computes it again), and the step gives
    the same output and, within float32 rounding, the same gradients."""
    out, grads, kept = _gated_layer_step(impl, False, per_block, dtype)
    out_r, grads_r, kept_r = _gated_layer_step(impl, True, per_block, dtype)
    assert len(kept) == len(kept_r) == 6
    assert all(kept) and not any(kept_r)
    torch.testing.assert_close(out_r, out, rtol=0, atol=0)
    # Under autocast both recompute the mask in the backward: identical.
    # In float32 on CPU the default reads it back from the gated weight:
    # the same numbers to float32 rounding.
    exact = dtype is not None or impl == "reference"
    for given, expected in zip(grads_r, grads):
        torch.testing.assert_close(
            given,
            expected,
            rtol=0 if exact else 1e-5,
            atol=0 if exact else 1e-6,
        )


@pytest.mark.parametrize(
    "impl, chunk",
    [("fused", 2), ("fused", 7), ("compiled", 6)],
)
def test_pregated_chunks_match_gating_one_by_one(impl, chunk):
    """pregated_weights (7 layers, 2 or 6 per call, so a short last call,
    or all in one call; tied groups) gives each layer's output, soft-zero
    count and gradients as gating one matrix at a time does; a chunk is
    gated on its first use. (The compiled kernels with the lobes' six per
    call: each other list length would compile them again.)"""
    shapes = [(4, 6), (6, 4), (4, 4), (5, 3), (3, 5), (6, 6), (2, 5)]
    results = {}
    for mode in ("one_by_one", "chunks"):
        torch.manual_seed(14)
        linears = [nn.Linear(n_in, n_out) for n_in, n_out in shapes]
        scales = torch.stack([layer.weight.detach().std() for layer in linears])
        gate = SelfPinchingGate(
            scales, [0, 1, 1, 2, 0, 3, 2], 0.05, 0.8, impl=impl
        )
        gated_layers = [
            GatedLinear(layer, gate, i) for i, layer in enumerate(linears)
        ]
        inputs = [
            torch.randn(2, n_in, requires_grad=True) for n_in, _ in shapes
        ]
        context = contextlib.nullcontext()
        if mode == "chunks":
            context = pregated_weights(
                gate, gated_layers, chunk=chunk, enabled=True
            )
        with context:
            outputs = [gated_layers[0](inputs[0])]
            if mode == "chunks":  # the first chunk only is gated so far
                assert [
                    layer.pregated is not None for layer in gated_layers
                ] == [i < chunk for i in range(len(shapes))]
            outputs += [
                layer(x) for layer, x in zip(gated_layers[1:], inputs[1:])
            ]
        assert all(layer.pregated is None for layer in gated_layers)
        assert all(layer.pending is None for layer in gated_layers)
        zeros = gate.recorded_soft_zeros(len(shapes))
        assert sorted(zeros) == list(range(len(shapes)))
        loss = sum(out.pow(2).sum() for out in outputs)
        (loss + torch.stack(list(zeros.values())).sum()).backward()
        results[mode] = (
            [out.detach() for out in outputs],
            [zeros[i].detach() for i in range(len(shapes))],
            [layer.weight.grad for layer in linears],
            gate.threshold_param.grad,
        )
    for expected, actual in zip(results["one_by_one"], results["chunks"]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_pregated_weights_steps_aside_where_it_does_not_apply():
    """No chunks for the reference gate, without gradients, for hard-pruned
    layers, or on CPU by default (``default_pregating``)."""

    def pending_after(gate, gated_layers, **kwargs):
        with pregated_weights(gate, gated_layers, **kwargs):
            return [layer.pending is not None for layer in gated_layers]

    gate, gated_layers = _compiled_layers(3)
    gate.impl = "fused"
    assert pending_after(gate, gated_layers, enabled=True) == [True] * 3
    assert pending_after(gate, gated_layers) == [False] * 3  # CPU default
    assert chunks.default_pregating(gated_layers[0].weight) is False
    with torch.no_grad():
        assert pending_after(gate, gated_layers, enabled=True) == [False] * 3
    gate.impl = "reference"
    assert pending_after(gate, gated_layers, enabled=True) == [False] * 3
    gate.impl = "fused"
    for layer in gated_layers:
        layer.mask = layer.weight.detach().abs() > 0.1
    assert pending_after(gate, gated_layers, enabled=True) == [False] * 3


def _compiled_layers(count):
    """``count`` gated 3 x 3 layers of one compiled gate."""
    linears = [nn.Linear(3, 3) for _ in range(count)]
    gate = SelfPinchingGate(
        torch.ones(count), list(range(count)), 0.05, 0.5, impl="compiled"
    )
    return gate, [
        GatedLinear(layer, gate, i) for i, layer in enumerate(linears)
    ]


def test_matrices_per_call_is_all_only_with_triton_in_one_process(
    monkeypatch,
):
    gate, gated_layers = _compiled_layers(12)
    assert matrices_per_call(gate, gated_layers) == MATRICES_PER_CALL == 6
    monkeypatch.setattr(triton_backend, "supports", lambda weights: True)
    assert matrices_per_call(gate, gated_layers) == 12
    monkeypatch.setattr(gate, "impl", "fused")  # eager kernels, no Triton
    assert matrices_per_call(gate, gated_layers) == MATRICES_PER_CALL
    monkeypatch.setattr(gate, "impl", "compiled")
    # DDP: per block, so that gradients come in while the backward runs.
    assert chunks.distributed_world_size() == 1
    monkeypatch.setattr(chunks, "distributed_world_size", lambda: 2)
    assert matrices_per_call(gate, gated_layers) == MATRICES_PER_CALL


def test_pregated_weights_gates_matrices_per_call_by_default(monkeypatch):
    gate, gated_layers = _compiled_layers(5)
    monkeypatch.setattr(gate, "impl", "fused")
    monkeypatch.setattr(chunks, "matrices_per_call", lambda gate, layers: 3)
    sizes = []
    forward_many = gate.forward_many

    def recording(first, weights, out_dtype=None):
        sizes.append((first, len(weights)))
        return forward_many(first, weights, out_dtype)

    monkeypatch.setattr(gate, "forward_many", recording)
    with pregated_weights(gate, gated_layers, enabled=True):
        for layer in gated_layers:
            layer(torch.randn(2, 3))
    assert sizes == [(0, 3), (3, 2)]


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
    assert saved == [(torch.bfloat16, "GateFunctionBackward")]
    for value, reference in zip(actual, expected):
        assert value.dtype == reference.dtype
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)


def test_per_matrix_training_compiles_nothing_more_for_other_shapes():
    """The compiled kernels compile once, for every weight shape: after
    one step, training gated layers one by one (square, wide and tall
    matrices) compiles nothing more."""
    from torch._dynamo.utils import counters

    def train(shapes, seed):
        torch.manual_seed(seed)
        linears = [torch.nn.Linear(n_in, n_out) for n_out, n_in in shapes]
        scales = torch.stack([layer.weight.detach().std() for layer in linears])
        gate = SelfPinchingGate(
            scales, list(range(len(shapes))), 0.05, 0.5, impl="compiled"
        )
        loss = 0
        for i, layer in enumerate(linears):
            x = torch.randn(2, layer.in_features, requires_grad=True)
            loss = loss + GatedLinear(layer, gate, i)(x).sum()
        loss.backward()
        return gate.threshold_param.grad

    train([(5, 7)], 2)  # the first compilation
    before = counters["stats"]["unique_graphs"]
    for _ in range(2):
        grad = train([(6, 6), (4, 9), (9, 4)], 3)
    assert counters["stats"]["unique_graphs"] == before
    assert (grad.abs() > 0).all()


# --- GatedLinear in autograd's corner cases, against the reference gate ----


def _layer_pass(impl, x, sizes=((48, 64),), bias=True, backwards=1, seed=0):
    """Outputs, soft-zero counts and every gradient of one pass of gated
    layers of ``sizes`` (out, in), each applied to ``x``."""
    torch.manual_seed(seed)
    linears = [nn.Linear(i, o, bias=bias) for o, i in sizes]
    scales = torch.stack([lin.weight.detach().std() for lin in linears])
    gate = SelfPinchingGate(
        scales, list(range(len(sizes))), 0.05, 0.8, impl=impl
    )
    gated = [GatedLinear(lin, gate, i) for i, lin in enumerate(linears)]
    x = x.detach().clone().requires_grad_(x.requires_grad)
    outputs = [layer(x) for layer in gated]
    zeros = [gate.soft_zeros[i] for i in range(len(gated))]
    loss = sum((out * out.detach().sin()).sum() for out in outputs)
    loss = loss + 1e-3 * sum(zeros)
    for i in range(backwards):
        loss.backward(retain_graph=i + 1 < backwards)
    grads = [gate.threshold_param.grad]
    for layer in gated:
        grads += [layer.weight.grad]
        grads += [layer.bias.grad] if bias else []
    grads += [x.grad] if x.requires_grad else []
    return outputs, zeros, grads


INPUTS = {
    "rows": lambda: torch.randn(5, 64),
    "batch-time": lambda: torch.randn(2, 7, 64),
    "transposed": lambda: torch.randn(64, 6).t(),  # not contiguous
    "empty": lambda: torch.randn(0, 64),  # empty batch
    "vector": lambda: torch.randn(64),  # one vector
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", list(INPUTS))
@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_gated_linear_matches_the_reference_gate(impl, shape, bias):
    """Any input layout: the outputs, soft-zero counts and gradients of
    the reference gate followed by the product."""
    torch.manual_seed(1)
    x = INPUTS[shape]().requires_grad_(True)
    fast = _layer_pass(impl, x, sizes=((48, 64), (32, 64)), bias=bias)
    reference = _layer_pass(
        "reference", x, sizes=((48, 64), (32, 64)), bias=bias
    )
    for a, b in zip(fast[0] + fast[1], reference[0] + reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(fast[2]) == len(reference[2]) == 1 + 2 * (2 if bias else 1) + 1
    for a, b in zip(fast[2], reference[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_second_backward_of_a_retained_graph(impl):
    x = torch.randn(5, 64, requires_grad=True)
    twice = _layer_pass(impl, x, backwards=2)[2]
    once = _layer_pass(impl, x)[2]
    reference = _layer_pass("reference", x, backwards=2)[2]
    for a, b, c in zip(twice, once, reference):
        torch.testing.assert_close(a, 2 * b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", ["weight", "threshold", "both"])
def test_frozen_parameters_get_no_gradient(frozen):
    results = {}
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        linear = nn.Linear(64, 48)
        gate = SelfPinchingGate(
            linear.weight.detach().std().reshape(1), [0], 0.05, 0.8, impl=impl
        )
        layer = GatedLinear(linear, gate, 0)
        if frozen in ("weight", "both"):
            layer.weight.requires_grad_(False)
        if frozen in ("threshold", "both"):
            gate.threshold_param.requires_grad_(False)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
        x.requires_grad_(True)
        out = layer(x).pow(2).sum()
        if 0 in gate.soft_zeros:
            out = out + gate.soft_zeros[0]
        out.backward()
        results[impl] = (
            layer.weight.grad,
            gate.threshold_param.grad,
            x.grad,
            layer.bias.grad,
        )
    for a, b in zip(results["fused"], results["reference"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (results["fused"][0] is None) == (frozen in ("weight", "both"))
    assert (results["fused"][1] is None) == (frozen in ("threshold", "both"))


def _fused_and_reference(run):
    """``run(impl)`` for the fused and the reference gate, compared (the
    fused backward reads the mask back from ``W * M`` on a CPU: float32
    rounding apart, up to about 1e-6 on gradients of 0.02)."""
    results = {impl: run(impl) for impl in ("fused", "reference")}
    for a, b in zip(results["fused"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return results["fused"]


def test_one_layer_used_twice_before_the_backward():
    def run(impl):
        (layer,), gate = _layers_of(impl, ((64, 64),))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
        hidden = layer(x)
        first = gate.soft_zeros[0]
        out = layer(hidden.tanh())
        (out.pow(2).sum() + 1e-3 * (first + gate.soft_zeros[0])).backward()
        return out, layer.weight.grad, gate.threshold_param.grad

    _fused_and_reference(run)


def test_input_gradient_first_then_the_rest():
    def run(impl):
        (layer,), gate = _layers_of(impl, ((48, 64),))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
        x.requires_grad_(True)
        loss = layer(x).pow(2).sum() + 1e-3 * gate.soft_zeros[0]
        (grad_x,) = torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
        return grad_x, layer.weight.grad, gate.threshold_param.grad

    _fused_and_reference(run)


def _layers_of(impl, sizes):
    """Gated layers of ``sizes`` (out, in) behind one gate of ``impl``."""
    torch.manual_seed(0)
    linears = [nn.Linear(i, o) for o, i in sizes]
    scales = torch.stack([lin.weight.detach().std() for lin in linears])
    gate = SelfPinchingGate(
        scales, list(range(len(sizes))), 0.05, 0.8, impl=impl
    )
    return [GatedLinear(lin, gate, i) for i, lin in enumerate(linears)], gate


@pytest.mark.parametrize("last", ["square", "linear"])
def test_gradient_penalty_on_the_input(last):
    """``create_graph=True`` through a gated layer gives the reference
    gate's gradients, also when the loss is linear in the layer's output
    (the incoming gradient then has no graph of its own)."""
    results = {}
    for impl in ("fused", "reference"):
        (layer,), gate = _layers_of(impl, ((48, 64),))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
        x.requires_grad_(True)
        out = layer(x)
        loss = out.pow(2).sum() if last == "square" else out.sum()
        loss = loss + 1e-3 * gate.soft_zeros[0]
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + grad_x.pow(2).sum()).backward()
        results[impl] = (
            grad_x.detach(),
            layer.weight.grad,
            layer.bias.grad,
            gate.threshold_param.grad,
        )
    for a, b in zip(results["fused"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    # The penalty reaches the weights.
    (layer,), _ = _layers_of("fused", ((48, 64),))
    x = torch.randn(5, 64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_a_weight_changed_in_place_before_the_backward_is_refused(impl):
    (layer,), _ = _layers_of(impl, ((48, 64),))
    out = layer(torch.randn(5, 64))
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_gated_weight_changed_in_place_is_refused_as_autograd_does():
    """On a CPU in float32 the backward reads the mask back from the gated
    weight: changing it in place before the backward is refused."""
    weight = torch.randn(8, 4, requires_grad=True)
    gate = SelfPinchingGate(torch.ones(1) * 0.5, [0], 0.05, 0.5)
    gated = gate(0, weight)
    loss = gated.sum()
    with torch.no_grad():
        gated.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_a_gated_weight_the_caller_holds_is_not_overwritten(impl):
    """``SelfPinchingGate.forward`` lets the backward write into no tensor
    the caller can see: the gated weight and the upstream gradient stay
    as they were, and the weight gradient is the reference's."""
    results = {}
    for name in (impl, "reference"):
        torch.manual_seed(0)
        weight = torch.randn(16, 8, requires_grad=True)
        upstream = torch.randn(16, 8)
        gate = SelfPinchingGate(torch.ones(1) * 0.5, [0], 0.05, 0.5, impl=name)
        gated = gate(0, weight)
        before, given = gated.detach().clone(), upstream.clone()
        gated.backward(given)
        assert torch.equal(gated.detach(), before)
        assert torch.equal(given, upstream)
        results[name] = weight.grad
    torch.testing.assert_close(results[impl], results["reference"])


@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_second_backward_after_a_first_of_a_retained_graph(impl):
    """Nothing but the gate holds ``W * M`` (a sum keeps nothing): a second
    backward of the retained graph doubles the gradients, as on the
    reference path."""
    grads = {}
    for name in (impl, "reference"):
        torch.manual_seed(0)
        weight = torch.randn(32, 16, requires_grad=True)
        gate = SelfPinchingGate(torch.ones(1) * 0.5, [0], 0.05, 0.5, impl=name)
        loss = gate(0, weight).sum() + 1e-2 * gate.soft_zeros[0]
        loss.backward(retain_graph=True)
        first = weight.grad.clone()
        loss.backward()
        grads[name] = (first, weight.grad.clone(), gate.threshold_param.grad)
    for fast, reference in zip(grads[impl], grads["reference"]):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[impl][1], 2 * grads[impl][0])


# --- Training steps of the tiny lobes --------------------------------------


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
    block's matrices in one call (``chunks.pregated_weights``), one by one
    otherwise, whatever the device's default.
    """
    torch.manual_seed(0)
    lobe = lobe_class(
        source,
        save_path="",
        target_sparsity=0.5,
        threshold_init=0.6,
        gate_impl=impl,
        sparsity_controller="lagrangian",  # a sparsity term to differentiate
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
        mock.patch.object(chunks, "default_pregating", lambda w: per_block),
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


@functools.cache
def reference_step(source, **options):
    """``lobe_step`` of the reference gate, computed once per arguments."""
    return lobe_step(source, "reference", **options)


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
    reference = reference_step(wav2vec2_source, device=device)
    step = lobe_step(wav2vec2_source, impl, device=device, per_block=per_block)
    assert step[3] == 12
    assert_same_step(step, reference)
    assert "gate.threshold_param" in step[2]
    assert "regularizer.multiplier_param" in step[2]


def test_lobe_step_gating_all_matrices_in_one_call_matches_reference(
    wav2vec2_source,
):
    """One gate call for all matrices (the default with the Triton kernels
    on one GPU; forced here on CPU with the eager kernels): the same step,
    and the sparsity term takes the call's counts whole."""
    reference = reference_step(wav2vec2_source)
    calls = []
    whole = layers.SelfPinchingGate.recorded_soft_zero_vector

    def recording(gate, count):
        calls.append(whole(gate, count))
        return calls[-1]

    with (
        mock.patch.object(chunks, "matrices_per_call", lambda g, layers: 12),
        mock.patch.object(
            layers.SelfPinchingGate, "recorded_soft_zero_vector", recording
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
    reference = reference_step(wav2vec2_source, layerdrop=0.5, seed=3)
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
    with mock.patch.object(chunks, "default_pregating", lambda w: per_block):
        for name, lobe in (("dense", dense), ("spg", spg)):
            lobe.model.config.layerdrop = 0.0
            lobe.train()
            step(lobe)()  # compiles the kernels first
            reads[name] = device_reads(step(lobe))
    assert reads["spg"] == reads["dense"]
    assert spg.gate.step_count == 2


def test_lobe_training_compiles_once_per_model(wav2vec2_source):
    """The first compiled training step of a lobe compiles its kernels; a
    later step of another lobe of the same model, on other data, compiles
    nothing (no per-step or per-instance recompiles)."""
    from torch._dynamo.utils import counters

    lobe_step(wav2vec2_source, "compiled", per_block=True)
    before = counters["stats"]["unique_graphs"]
    step = lobe_step(wav2vec2_source, "compiled", seed=2, per_block=True)
    assert counters["stats"]["unique_graphs"] == before
    assert step[3] == 12


def _skipped_blocks(grads):
    """Transformer blocks none of whose weights got a gradient."""
    return {
        block
        for block in ("0", "1")
        if not any(f"encoder.layers.{block}." in name for name in grads)
    }


@functools.cache
def layerdrop_seed(source):
    """A seed in 0..19 where LayerDrop (0.5) skips one of the 2 blocks."""
    for seed in range(20):
        grads = reference_step(source, layerdrop=0.5, seed=seed)[2]
        if len(_skipped_blocks(grads)) == 1:
            return seed
    raise AssertionError("no seed in 0..19 skipped one block")


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
    seed = layerdrop_seed(wav2vec2_source)
    reference = reference_step(wav2vec2_source, layerdrop=0.5, seed=seed)
    assert len(_skipped_blocks(reference[2])) == 1
    step = lobe_step(
        wav2vec2_source, impl, layerdrop=0.5, seed=seed, per_block=per_block
    )
    # The skipped block's chunk was never gated: its counts come from the
    # separate soft-zeros pass.
    assert step[3] == 6
    assert _skipped_blocks(step[2]) == _skipped_blocks(reference[2])
    assert_same_step(step, reference)


def test_layerdrop_with_all_matrices_in_one_call_matches_reference(
    wav2vec2_source,
):
    """One gate call for all matrices (the default with the Triton kernels
    on one GPU; forced here on CPU) gates a block that LayerDrop then skips:
    its weights get no gradient, its counts are recorded (12, not 6) and
    the step equals the reference one."""
    seed = layerdrop_seed(wav2vec2_source)
    reference = reference_step(wav2vec2_source, layerdrop=0.5, seed=seed)
    with mock.patch.object(chunks, "matrices_per_call", lambda g, layers: 12):
        step = lobe_step(
            wav2vec2_source, "fused", layerdrop=0.5, seed=seed, per_block=True
        )
    assert step[3] == 12
    assert _skipped_blocks(step[2]) == _skipped_blocks(reference[2])
    assert len(_skipped_blocks(step[2])) == 1
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
    reference = reference_step(wav2vec2_source, dtype=dtype, device=device)
    out, loss, grads, recorded = lobe_step(
        wav2vec2_source, impl, dtype=dtype, device=device, per_block=per_block
    )
    # The lobe's output dtype follows autocast's rules for its last layer
    # (bf16 on CPU, float32 on CUDA): the same as the reference path's.
    assert out.dtype == reference[0].dtype and recorded == 12
    assert all(g.dtype == torch.float32 for g in grads.values())
    # The output's tolerance: assert_close's default for its dtype.
    assert_same_step(
        (out, loss, grads, recorded), reference, rtol=None, atol=None
    )


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["hubert", "wavlm"])
def test_hubert_and_wavlm_steps_match_reference(
    tiny_sources, model_type, dtype
):
    """The per-block compiled gate also serves HuBERT and WavLM (whose
    attention reads the gated weights through ``effective_weights``), in
    float32 and under bf16 autocast."""
    lobe_class = {"hubert": SPGHuBERT, "wavlm": SPGWavLM}[model_type]
    source = tiny_sources[model_type]
    reference = reference_step(source, dtype=dtype, lobe_class=lobe_class)
    step = lobe_step(
        source, "compiled", dtype=dtype, lobe_class=lobe_class, per_block=True
    )
    assert step[3] == 12 and step[0].dtype == reference[0].dtype
    assert_same_step(step, reference)
