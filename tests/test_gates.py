"""Tests of the self-pinching gate: gradients, masks, mixed precision, cache."""

import contextlib
import math
import weakref
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import device_reads
from torch import nn

from speechbrain_spg import gates, triton_gate
from speechbrain_spg.gates import (
    GatedLinear,
    PinchFunction,
    SelfPinchingGate,
    SoftZerosFunction,
    group_indices,
    hard_mask,
    pinch_reference,
    pregated_weights,
    soft_mask,
)

#: CPU always; CUDA too where a GPU is present (not generated elsewhere).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _weight_and_threshold(seed=0, shape=(7, 5)):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, dtype=torch.float64, generator=generator)
    threshold = torch.tensor(0.6, dtype=torch.float64)
    return weight, threshold


def _gated_linear(seed=0, in_features=8, out_features=4, threshold=0.5):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    gate = SelfPinchingGate(
        layer.weight.detach().std().reshape(1), [0], 0.05, threshold
    )
    return GatedLinear(layer, gate, 0), gate


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_pinch_function_gradcheck_weight_and_threshold(tau):
    weight, threshold = _weight_and_threshold()
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(
        PinchFunction.apply, (weight, threshold, tau), eps=1e-6, atol=1e-8
    )


def test_pinch_function_gradcheck_threshold_only():
    weight, threshold = _weight_and_threshold(seed=1)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(
        PinchFunction.apply, (weight, threshold, 0.1), eps=1e-6, atol=1e-8
    )


def test_soft_zeros_function_gradcheck_threshold():
    weight, threshold = _weight_and_threshold(seed=2)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(
        SoftZerosFunction.apply, (weight, threshold, 0.1), eps=1e-6, atol=1e-8
    )


def test_pinch_function_matches_plain_autograd_reference():
    weight, threshold = _weight_and_threshold(seed=3, shape=(32, 16))
    tau = 0.08
    upstream = torch.randn(32, 16, dtype=torch.float64)

    w1 = weight.clone().requires_grad_(True)
    t1 = threshold.clone().requires_grad_(True)
    out_custom = PinchFunction.apply(w1, t1, tau)
    out_custom.backward(upstream)

    w2 = weight.clone().requires_grad_(True)
    t2 = threshold.clone().requires_grad_(True)
    out_reference = pinch_reference(w2, t2, tau)
    out_reference.backward(upstream)

    assert (out_custom - out_reference).abs().max().item() <= 1e-12
    assert (w1.grad - w2.grad).abs().max().item() <= 1e-12
    assert abs(t1.grad.item() - t2.grad.item()) <= 1e-12
    # The threshold gradient is not trivially zero.
    assert abs(t2.grad.item()) > 1e-3


def test_soft_zeros_function_matches_plain_autograd_reference():
    weight, threshold = _weight_and_threshold(seed=4, shape=(20, 10))
    tau = 0.08
    t1 = threshold.clone().requires_grad_(True)
    count = SoftZerosFunction.apply(weight, t1, tau)
    count.backward()
    t2 = threshold.clone().requires_grad_(True)
    reference = (1 - soft_mask(weight, t2, tau)).sum()
    reference.backward()
    assert abs(count.item() - reference.item()) <= 1e-12
    assert abs(t1.grad.item() - t2.grad.item()) <= 1e-12
    assert t2.grad.item() > 0  # a larger threshold pinches more weights


def test_threshold_sign_does_not_matter():
    weight, threshold = _weight_and_threshold(seed=5)
    assert torch.equal(
        PinchFunction.apply(weight, threshold, 0.1),
        PinchFunction.apply(weight, -threshold, 0.1),
    )
    assert torch.equal(
        hard_mask(weight, threshold), hard_mask(weight, -threshold)
    )


def test_hard_and_soft_masks_agree_away_from_threshold():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(64, 64, dtype=torch.float64, generator=generator)
    threshold = torch.tensor(0.7, dtype=torch.float64)
    tau = 0.005
    far = (weight * weight - threshold * threshold).abs() > 20 * tau
    assert far.sum().item() > 0.8 * weight.numel()
    soft = soft_mask(weight, threshold, tau)
    hard = hard_mask(weight, threshold)
    # (W^2 - t^2) / (2 tau) is beyond +-10 there: sigmoid(-10) < 4.6e-5.
    assert torch.equal((soft > 0.5)[far], hard[far])
    bound = 1 / (1 + math.exp(10))
    assert (soft - hard.double()).abs()[far].max().item() <= bound
    # Near the threshold the soft mask is genuinely soft.
    near = (weight.abs() - threshold).abs() < 1e-2
    assert ((soft[near] > 0.05) & (soft[near] < 0.95)).all()


def test_gated_linear_under_bfloat16_autocast():
    gated, gate = _gated_linear(seed=7, in_features=16, out_features=8)
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
    assert "gate_index=0" in repr(gated)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "fused", "compiled"])
def test_gating_reads_nothing_back_from_the_device(impl, device):
    """Gating a matrix forward and backward needs no device read-back: on
    a GPU one per gated matrix would stall the host every layer."""
    torch.manual_seed(11)
    layers = [nn.Linear(6, 5).to(device) for _ in range(4)]
    scales = torch.stack([layer.weight.detach().std() for layer in layers])
    gate = SelfPinchingGate(scales, [0, 1, 1, 2], 0.05, 0.5, impl=impl)
    gate.to(device)
    gated = [GatedLinear(layer, gate, i) for i, layer in enumerate(layers)]
    x = torch.randn(3, 6, device=device, requires_grad=True)

    def step():
        sum(layer(x).sum() for layer in gated).backward()

    step()  # compiles the kernels of the compiled path first
    assert device_reads(step) == 0
    assert gate.threshold_param.grad.abs().min() > 0


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
            pinch_reference(weight, expected, gate.taus()[index]),
        )


def _gated_layer_step(impl, recompute, per_block=False, dtype=None):
    """One training step of two gated layers (3-D input, one per block
    call when ``per_block``); returns output, gradients and whether the
    gated weights were still alive after the forward pass."""
    torch.manual_seed(21)
    linears = [nn.Linear(6, 5), nn.Linear(5, 4)]
    scales = torch.stack([layer.weight.detach().std() for layer in linears])
    gate = SelfPinchingGate(
        scales, [0, 1], 0.05, 0.8, impl=impl, recompute_gated=recompute
    )
    layers = [GatedLinear(layer, gate, i) for i, layer in enumerate(linears)]
    x = torch.randn(2, 3, 6, requires_grad=True)
    alive = []
    effective_weight = GatedLinear.effective_weight

    def watched(self, *args, **kwargs):
        weight = effective_weight(self, *args, **kwargs)
        alive.append(weakref.ref(weight))
        return weight

    context = (
        pregated_weights(gate, layers, enabled=True)
        if per_block
        else contextlib.nullcontext()
    )
    with (
        mock.patch.object(GatedLinear, "effective_weight", watched),
        torch.autocast("cpu", dtype=dtype, enabled=dtype is not None),
        context,
    ):
        out = layers[1](layers[0](x))
    kept = [ref() is not None for ref in alive]
    zeros = sum(gate.recorded_soft_zeros(2).values())
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


@pytest.mark.parametrize("chunk", [2, 5])
@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_pregated_chunks_match_gating_one_by_one(impl, chunk):
    """pregated_weights (5 layers, 2 per call, so a short last call, or all
    in one call; tied groups) gives each layer's output, soft-zero count
    and gradients as gating one matrix at a time does; a chunk is gated on
    its first use."""
    shapes = [(4, 6), (6, 4), (4, 4), (5, 3), (3, 5)]  # (in, out)
    results = {}
    for mode in ("one_by_one", "chunks"):
        torch.manual_seed(14)
        linears = [nn.Linear(n_in, n_out) for n_in, n_out in shapes]
        scales = torch.stack([layer.weight.detach().std() for layer in linears])
        gate = SelfPinchingGate(scales, [0, 1, 1, 2, 0], 0.05, 0.8, impl=impl)
        layers = [
            GatedLinear(layer, gate, i) for i, layer in enumerate(linears)
        ]
        inputs = [
            torch.randn(2, n_in, requires_grad=True) for n_in, _ in shapes
        ]
        context = contextlib.nullcontext()
        if mode == "chunks":
            context = pregated_weights(gate, layers, chunk=chunk, enabled=True)
        with context:
            outputs = [layers[0](inputs[0])]
            if mode == "chunks":  # the first chunk only is gated so far
                assert [layer.pregated is not None for layer in layers] == [
                    i < chunk for i in range(len(shapes))
                ]
            outputs += [layer(x) for layer, x in zip(layers[1:], inputs[1:])]
        assert all(layer.pregated is None for layer in layers)
        zeros = gate.recorded_soft_zeros(len(shapes))
        assert sorted(zeros) == [0, 1, 2, 3, 4]
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
    gate, layers = _compiled_layers(12)
    assert gates.matrices_per_call(gate, layers) == gates.MATRICES_PER_CALL
    monkeypatch.setattr(triton_gate, "supports", lambda weights: True)
    assert gates.matrices_per_call(gate, layers) == 12
    monkeypatch.setattr(gate, "impl", "fused")  # eager kernels, no Triton
    assert gates.matrices_per_call(gate, layers) == gates.MATRICES_PER_CALL
    monkeypatch.setattr(gate, "impl", "compiled")
    # DDP: per block, so that gradients come in while the backward runs.
    monkeypatch.setattr(gates, "distributed_world_size", lambda: 2)
    assert gates.matrices_per_call(gate, layers) == gates.MATRICES_PER_CALL


def test_pregated_weights_gates_matrices_per_call_by_default(monkeypatch):
    gate, layers = _compiled_layers(5)
    monkeypatch.setattr(gate, "impl", "fused")
    monkeypatch.setattr(gates, "matrices_per_call", lambda gate, layers: 3)
    sizes = []
    forward_many = gate.forward_many

    def recording(first, weights, out_dtype=None):
        sizes.append((first, len(weights)))
        return forward_many(first, weights, out_dtype)

    monkeypatch.setattr(gate, "forward_many", recording)
    with pregated_weights(gate, layers, enabled=True):
        for layer in layers:
            layer(torch.randn(2, 3))
    assert sizes == [(0, 3), (3, 2)]


def test_forward_many_refuses_the_reference_gate():
    gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5)
    with pytest.raises(ValueError, match="forward_many: the reference gate"):
        gate.forward_many(0, [torch.ones(2, 2)])


def test_an_unused_gated_weight_gets_no_gradient():
    """A matrix whose gated weight is not used gets no weight gradient (as
    a plain unused parameter), though it was gated in the same call as a
    used one; its threshold still gets the soft-zero count's gradient."""
    from speechbrain_spg.batched_gate import (
        EAGER_BATCH_KERNELS,
        FusedPinchAllFunction,
    )

    weights = [torch.randn(3, 2, requires_grad=True) for _ in range(2)]
    thresholds = torch.tensor([0.5, 0.6], requires_grad=True)
    zeros, used, _ = FusedPinchAllFunction.apply(
        thresholds,
        torch.tensor([0.1, 0.1]),
        EAGER_BATCH_KERNELS,
        None,
        None,
        *weights,
    )
    (used.sum() + zeros.sum()).backward()
    assert weights[0].grad is not None and weights[1].grad is None
    assert (thresholds.grad != 0).all()
