"""The gate and the matrix product in one autograd node (``fused_linear``).

It must give the outputs, soft-zero counts and gradients of the gate
followed by ``F.linear`` (within float32 rounding), keep the weight's
gradient in the gated weight's kept memory, need no new memory of the
weight's size in the backward, and step aside for every call it does not
take.
"""

import pytest
import torch

from speechbrain_spg import native_gate
from speechbrain_spg.fused_linear import GatedLinearFunction
from speechbrain_spg.gates import GatedLinear, SelfPinchingGate
from speechbrain_spg.reused_memory import ReusedMemory, storage_holders

pytestmark = [
    pytest.mark.skipif(
        not native_gate.available(),
        reason="native kernels need an x86-64 Linux CPU with AVX2 and a C "
        "compiler",
    ),
    pytest.mark.skipif(
        storage_holders(torch.empty(1).untyped_storage()) is None,
        reason="this PyTorch does not count a storage's references",
    ),
]


def layers(fused, sizes=((48, 64), (48, 64)), bias=True, seed=0):
    """Gated linear layers of ``sizes`` (out, in) behind one compiled gate
    (one tie group per layer); ``fused`` False takes the two-node path
    (no kept memory)."""
    torch.manual_seed(seed)
    linears = [torch.nn.Linear(i, o, bias=bias) for o, i in sizes]
    scales = torch.stack([lin.weight.detach().std() for lin in linears])
    gate = SelfPinchingGate(
        scales,
        list(range(len(sizes))),
        0.05,
        0.8,
        impl="compiled",
        reuse_memory=fused,
    )
    return [GatedLinear(lin, gate, i) for i, lin in enumerate(linears)], gate


def run(fused, x, sizes=((48, 64), (48, 64)), bias=True, backwards=1):
    """Output, soft-zero counts and all gradients of one pass of the
    layers (each applied to ``x``), and the gate."""
    gated, gate = layers(fused, sizes, bias)
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
    return outputs, zeros, grads, gate, gated


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(5, 64),
        torch.randn(2, 7, 64),  # batch and time
        torch.randn(64, 6).t(),  # not contiguous
        torch.randn(0, 64),  # empty batch
        torch.randn(64),  # one vector
    ],
    ids=["rows", "batch-time", "transposed", "empty", "vector"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_same_numbers_as_gate_then_product(x, bias):
    x.requires_grad_(True)
    fused = run(True, x, bias=bias)
    plain = run(False, x, bias=bias)
    assert fused[3].memory_held > 0 and plain[3].memory_held == 0
    for a, b in zip(fused[0] + fused[1], plain[0] + plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(fused[2]) == len(plain[2])
    for a, b in zip(fused[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Really the one-node path: its node in the graph, the gradient in the
    # kept memory of each layer.
    assert type(fused[0][0].grad_fn).__name__ == "GatedLinearFunctionBackward"
    for layer, memory in zip(fused[4], fused[3]._memories):
        assert layer.weight.grad.data_ptr() == memory._storage.data_ptr()


def test_layers_of_one_size_share_the_product_memory():
    x = torch.randn(5, 64, requires_grad=True)
    _, _, _, gate, _ = run(True, x, sizes=((48, 64), (48, 64), (32, 64)))
    assert sorted(gate._product_memories) == [32 * 64, 48 * 64]
    # W * M of each layer, and one product memory per size.
    assert gate.memory_held == 4 * (2 * 48 * 64 + 32 * 64 + 48 * 64 + 32 * 64)


def test_steps_reuse_the_same_memory():
    gated, gate = layers(True)
    optimizer = torch.optim.SGD(
        [p for layer in gated for p in layer.parameters()]
        + list(gate.parameters()),
        lr=1e-2,
    )
    addresses = set()
    for _ in range(3):
        x = torch.randn(5, 64, requires_grad=True)
        sum(layer(x).pow(2).sum() for layer in gated).backward()
        addresses.add(tuple(layer.weight.grad.data_ptr() for layer in gated))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert len(addresses) == 1
    assert gate.memory_held == 4 * 3 * 48 * 64


def test_second_backward_of_a_retained_graph():
    x = torch.randn(5, 64, requires_grad=True)
    twice = run(True, x, backwards=2)[2]
    once = run(True, x)[2]
    plain = run(False, x, backwards=2)[2]
    for a, b, c in zip(twice, once, plain):
        # The second backward recomputes W * M: float32 rounding apart.
        torch.testing.assert_close(a, 2 * b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "frozen", ["weight", "threshold", "both"], ids=lambda f: f"frozen-{f}"
)
def test_frozen_parameters_get_no_gradient(frozen):
    results = {}
    for fused in (True, False):
        gated, gate = layers(fused, sizes=((48, 64),))
        layer = gated[0]
        if frozen in ("weight", "both"):
            layer.weight.requires_grad_(False)
        if frozen in ("threshold", "both"):
            gate.threshold_param.requires_grad_(False)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
        x.requires_grad_(True)
        (layer(x).pow(2).sum() + gate.soft_zeros[0]).backward()
        results[fused] = (
            layer.weight.grad,
            gate.threshold_param.grad,
            x.grad,
            layer.bias.grad,
        )
    for a, b in zip(results[True], results[False]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (results[True][0] is None) == (frozen in ("weight", "both"))


def test_a_weight_changed_in_place_before_the_backward_is_refused():
    gated, _ = layers(True, sizes=((48, 64),))
    out = gated[0](torch.randn(5, 64))
    with torch.no_grad():
        gated[0].weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_calls_it_does_not_take_go_through_gate_and_product():
    gated, gate = layers(True, sizes=((48, 64),))
    layer = gated[0]
    x = torch.randn(5, 64)

    def node():
        return type(layer(x).grad_fn).__name__

    assert node() == "GatedLinearFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert node() != "GatedLinearFunctionBackward"
    gate.reuse_memory = False
    assert node() != "GatedLinearFunctionBackward"
    gate.reuse_memory = True
    layer.double()
    gate.double()
    x = x.double()
    assert node() != "GatedLinearFunctionBackward"
    assert gate.memory_held == 0  # the float32 memories let go
    layer.float()
    gate.float()
    x = x.float()
    gate.recompute_gated = True
    assert node() != "GatedLinearFunctionBackward"
    gate.recompute_gated = False
    layer.weight.requires_grad_(False)  # nothing of the gate to train
    gate.threshold_param.requires_grad_(False)
    assert node() != "GatedLinearFunctionBackward"
    layer.weight.requires_grad_(True)
    gate.threshold_param.requires_grad_(True)
    layer.mask = layer.weight.detach().abs() > 0.1  # hard-pruned
    assert node() != "GatedLinearFunctionBackward"
    layer.mask = None
    assert node() == "GatedLinearFunctionBackward"
    gate.eval()
    assert node() != "GatedLinearFunctionBackward"
    with torch.no_grad():
        assert layer(x).grad_fn is None


def test_function_alone_matches_the_float64_math():
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.float64)
    w = torch.randn(8, 16, dtype=torch.float64) * 0.3
    b = torch.randn(8, dtype=torch.float64)
    t = torch.tensor(0.25, dtype=torch.float64)
    tau = torch.tensor(0.01, dtype=torch.float64)
    upstream = torch.randn(6, 8, dtype=torch.float64)

    def grads(fused, *tensors):
        tensors = [v.clone().requires_grad_(True) for v in tensors]
        x, w, b, t = tensors
        if fused:
            y, zeros = GatedLinearFunction.apply(
                x, w, b, t, tau.float(), ReusedMemory(), ReusedMemory()
            )
        else:
            mask = torch.sigmoid((w * w - t * t) / (2 * tau))
            y = torch.nn.functional.linear(x, w * mask, b)
            # The soft-zero count is differentiable in t only.
            unmoved = torch.sigmoid((w.detach() ** 2 - t * t) / (2 * tau))
            zeros = (1 - unmoved).sum()
        ((y * upstream).sum() + 0.1 * zeros).backward()
        return [y.detach(), zeros.detach(), *(v.grad for v in tensors)]

    fused = grads(True, *(v.float() for v in (x, w, b, t)))
    exact = grads(False, x, w, b, t)
    for a, e in zip(fused, exact):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


def test_one_layer_used_twice_before_the_backward():
    results = {}
    for fused in (True, False):
        gated, gate = layers(fused, sizes=((64, 64),))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
        hidden = gated[0](x)
        first = gate.soft_zeros[0]
        out = gated[0](hidden.tanh())
        (out.pow(2).sum() + 1e-3 * (first + gate.soft_zeros[0])).backward()
        results[fused] = (out, gated[0].weight.grad, gate.threshold_param.grad)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_input_gradient_first_then_the_rest():
    results = {}
    for fused in (True, False):
        gated, gate = layers(fused, sizes=((48, 64),))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
        x.requires_grad_(True)
        loss = gated[0](x).pow(2).sum() + 1e-3 * gate.soft_zeros[0]
        (grad_x,) = torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
        results[fused] = (
            grad_x,
            gated[0].weight.grad,
            gate.threshold_param.grad,
        )
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("last", ["square", "linear"])
def test_gradient_penalty_on_the_input(last):
    """``create_graph=True`` through the node gives the gradients of the
    two-node path, also when the loss is linear in the layer's output (the
    incoming gradient then has no graph of its own)."""
    results = {}
    for fused in (True, False):
        gated, gate = layers(fused, sizes=((48, 64),))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
        x.requires_grad_(True)
        out = gated[0](x)
        loss = out.pow(2).sum() if last == "square" else out.sum()
        loss = loss + 1e-3 * gate.soft_zeros[0]
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + grad_x.pow(2).sum()).backward()
        results[fused] = (
            grad_x.detach(),
            gated[0].weight.grad,
            gated[0].bias.grad,
            gate.threshold_param.grad,
        )
    for a, b in zip(results[True], results[False]):
        # Second-order terms: the gate's PyTorch math against its kernels.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    # The penalty reaches the weights.
    gated, gate = layers(True, sizes=((48, 64),))
    x = torch.randn(5, 64, requires_grad=True)
    out = gated[0](x).sum()
    (grad_x,) = torch.autograd.grad(out, x, create_graph=True)
    grad_x.pow(2).sum().backward()
    assert gated[0].weight.grad.abs().sum() > 0


def test_turning_reuse_memory_off_lets_the_next_eval_free_it():
    gated, gate = layers(True, sizes=((48, 64),))
    gated[0](torch.randn(5, 64)).sum().backward()
    assert gate.memory_held == 2 * 48 * 64 * 4
    gate.reuse_memory = False
    gated[0].weight.grad = None
    gated[0](torch.randn(5, 64)).sum().backward()
    assert type(gated[0](torch.randn(5, 64)).grad_fn).__name__ != (
        "GatedLinearFunctionBackward"
    )
    gate.eval()
    assert gate.memory_held == 0
