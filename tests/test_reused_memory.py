"""Memory of the gated weights kept from step to step (``reused_memory``).

``ReusedMemory`` must hand its memory out again only when no tensor holds
it. With the C kernels, a gate that keeps its memory must give exactly the
gradients of one that does not (plain steps, gradients kept across steps,
a retained graph, a gated weight the caller holds, a recomputed mask), and
the weight's gradient must then live in the kept memory.
"""

import copy
import pickle

import pytest
import torch

from speechbrain_spg import native_gate, reused_memory
from speechbrain_spg.gates import GatedLinear, SelfPinchingGate
from speechbrain_spg.reused_memory import ReusedMemory, tensor_on

needs_native = pytest.mark.skipif(
    not native_gate.available(),
    reason="native kernels need an x86-64 Linux CPU with AVX2 and a C compiler",
)
counts_storages = pytest.mark.skipif(
    reused_memory.storage_holders(torch.empty(1).untyped_storage()) is None,
    reason="this PyTorch does not count a storage's references",
)


@counts_storages
def test_memory_is_handed_out_again_once_free():
    memory = ReusedMemory()
    first = memory.take(torch.zeros(4, 5))
    address = first.data_ptr()
    held = memory.take(torch.zeros(4, 5))  # `first` still holds it
    assert held.data_ptr() != address
    del first
    assert memory.take_if_free(torch.zeros(4, 5)) is None  # now `held`'s
    address = held.data_ptr()
    del held
    again = memory.take(torch.zeros(20))
    assert again.data_ptr() == address and again.shape == (20,)
    assert memory.held == 80


@counts_storages
def test_a_view_or_a_kept_gradient_holds_the_memory():
    memory = ReusedMemory()
    taken = memory.take(torch.zeros(6))
    view = taken.view(2, 3)
    del taken
    assert memory.take_if_free(torch.zeros(6)) is None
    assert not memory.only_held_by(0)
    del view
    assert memory.only_held_by(0)
    assert memory.take_if_free(torch.zeros(6)) is not None


@counts_storages
def test_another_size_dtype_or_released_memory_gives_new_memory():
    memory = ReusedMemory()
    address = memory.take(torch.zeros(8)).data_ptr()
    assert memory.take_if_free(torch.zeros(9)) is None
    assert memory.take_if_free(torch.zeros(8, dtype=torch.float64)) is None
    assert memory.take_if_free(torch.zeros(4, dtype=torch.float64)) is not None
    memory.release()
    assert memory.held == 0 and memory.take_if_free(torch.zeros(8)) is None
    assert memory.take(torch.zeros(8)).numel() == 8
    del address


def test_without_reference_counts_memory_is_never_reused(monkeypatch):
    monkeypatch.setattr(reused_memory, "_use_count", None)
    memory = ReusedMemory()
    first = memory.take(torch.zeros(3))
    address = first.data_ptr()
    del first
    assert memory.take_if_free(torch.zeros(3)) is None
    assert not memory.only_held_by(0)
    second = memory.take(torch.zeros(3))
    assert second.shape == (3,) and memory.held == 12
    del address


def test_copies_keep_no_memory():
    memory = ReusedMemory()
    memory.take(torch.zeros(5))
    assert memory.held == 20
    assert copy.deepcopy(memory).held == 0
    assert pickle.loads(pickle.dumps(memory)).held == 0
    assert memory.held == 20


def test_tensor_on_is_not_a_view():
    storage = torch.arange(6.0).untyped_storage()
    a = tensor_on(storage, torch.zeros(2, 3))
    b = tensor_on(storage, torch.zeros(2, 3))
    assert a._base is None and a.is_contiguous()
    versions = a._version, b._version
    b.add_(1.0)  # writes the shared memory, bumps b's version only
    assert (a._version, b._version) == (versions[0], versions[1] + 1)
    assert a.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


#: Memory a gated 48 x 64 layer keeps in training: W * M (then W.grad), and
#: the gradient of W * M in the backward (``fused_linear``).
LAYER_MEMORY = 2 * 48 * 64 * 4


def lone_gate(reuse=True):
    """A compiled gate of one matrix (scale 0.5), called directly."""
    return SelfPinchingGate(
        torch.ones(1) * 0.5, [0], 0.05, 0.5, impl="compiled", reuse_memory=reuse
    )


def gated_layer(reuse, seed=0, size=(48, 64)):
    """A ``size`` (out, in) layer behind a compiled gate, and Adam over
    both."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(size[1], size[0])
    gate = SelfPinchingGate(
        linear.weight.detach().std().reshape(1),
        [0],
        0.05,
        0.5,
        impl="compiled",
        reuse_memory=reuse,
    )
    layer = GatedLinear(linear, gate, 0)
    optimizer = torch.optim.Adam(
        [*linear.parameters(), *gate.parameters()], lr=1e-2
    )
    return layer, gate, optimizer


def train(
    reuse, steps=3, x_grad=True, set_to_none=True, backwards=1, size=(48, 64)
):
    """Gradients of the last of ``steps`` Adam steps, the addresses of the
    weight's gradient at every step, and the gate."""
    layer, gate, optimizer = gated_layer(reuse, size=size)
    generator = torch.Generator().manual_seed(1)
    addresses = []
    for _ in range(steps):
        x = torch.randn(5, size[1], generator=generator, requires_grad=x_grad)
        loss = layer(x).pow(2).sum() + 1e-3 * gate.soft_zeros[0]
        for i in range(backwards):
            loss.backward(retain_graph=i + 1 < backwards)
        addresses.append(layer.weight.grad.data_ptr())
        grads = (
            layer.weight.grad.clone(),
            gate.threshold_param.grad.clone(),
            layer.bias.grad.clone(),
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
    return grads, addresses, gate


@needs_native
@counts_storages
@pytest.mark.parametrize(
    "case",
    [
        {},
        {"x_grad": False},  # no x gradient (see below)
        {"set_to_none": False},  # gradients kept across steps
        {"backwards": 2},  # retained graph, second backward
    ],
    ids=["plain", "no-x-gradient", "kept-gradients", "retained-graph"],
)
def test_kept_memory_changes_no_gradient(case):
    kept, addresses, gate = train(True, **case)
    fresh, _, _ = train(False, **case)
    for a, b in zip(kept, fresh):
        if case == {"x_grad": False}:
            # Without kept memory the gate then recomputes the mask (the
            # product keeps no W * M); with it, the mask is read back from
            # W * M: float32 rounding apart.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
    assert gate.memory_held == LAYER_MEMORY
    if case in ({}, {"x_grad": False}):
        # The weight's gradient lives in the kept memory, every step.
        assert len(set(addresses)) == 1
        assert addresses[0] == gate._memories[0]._storage.data_ptr()


@needs_native
@counts_storages
def test_a_gated_weight_the_caller_holds_is_not_overwritten():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, requires_grad=True)
    gate = lone_gate()
    gated = gate(0, weight)
    before = gated.detach().clone()
    (gated * torch.randn(16, 8)).sum().backward()
    assert torch.equal(gated.detach(), before)
    reference = lone_gate(False)
    torch.manual_seed(0)
    other = torch.randn(16, 8, requires_grad=True)
    (reference(0, other) * torch.randn(16, 8)).sum().backward()
    assert torch.equal(weight.grad, other.grad)


@needs_native
def test_evaluation_and_recompute_gated_keep_no_memory():
    layer, gate, _ = gated_layer(True)
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert gate.memory_held == LAYER_MEMORY
    gate.eval()
    assert gate.memory_held == 0
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert gate.memory_held == 0  # not in training mode
    gate.train()
    gate.recompute_gated = True
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert gate.memory_held == 0


@needs_native
def test_weights_the_c_kernels_do_not_take_keep_no_memory():
    layer, gate, _ = gated_layer(True)
    layer(torch.randn(3, 64)).sum().backward()
    assert gate.memory_held == LAYER_MEMORY
    layer.double()
    gate.double()
    layer.weight.grad = None
    layer(torch.randn(3, 64, dtype=torch.float64)).sum().backward()
    # float64 goes to the torch.compile kernels: the float32 memory is let go.
    assert gate.memory_held == 0 and layer.weight.grad.dtype == torch.float64


@needs_native
def test_copied_gate_starts_without_memory():
    layer, gate, _ = gated_layer(True)
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
    gate.soft_zeros.clear()  # the pass's counts (graph tensors) are not copied
    copied = copy.deepcopy(gate)
    assert copied.memory_held == 0 and gate.memory_held > 0


@needs_native
@counts_storages
def test_second_backward_after_the_gated_weight_became_the_gradient():
    """Nothing but the gate holds ``W * M`` (a sum keeps nothing), so the
    first backward writes the gradient over it; the second backward of the
    retained graph must then recompute the mask."""
    grads = {}
    for reuse in (True, False):
        torch.manual_seed(0)
        weight = torch.randn(32, 16, requires_grad=True)
        gate = lone_gate(reuse)
        loss = gate(0, weight).sum() + 1e-2 * gate.soft_zeros[0]
        loss.backward(retain_graph=True)
        first = weight.grad.clone()
        if reuse:
            address = gate._memories[0]._storage.data_ptr()
            assert weight.grad.data_ptr() == address
        loss.backward()
        grads[reuse] = (first, weight.grad.clone(), gate.threshold_param.grad)
    for kept, fresh in zip(grads[True], grads[False]):
        # The second backward recomputes the mask: float32 rounding apart.
        torch.testing.assert_close(kept, fresh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[True][1], 2 * grads[True][0])


@needs_native
@counts_storages
def test_a_gated_weight_changed_in_place_is_refused_as_autograd_does():
    weight = torch.randn(8, 4, requires_grad=True)
    for reuse in (True, False):
        gate = lone_gate(reuse)
        gated = gate(0, weight)
        loss = gated.sum()
        with torch.no_grad():
            gated.mul_(2.0)
        with pytest.raises(
            RuntimeError, match="modified by an inplace operation"
        ):
            loss.backward()
