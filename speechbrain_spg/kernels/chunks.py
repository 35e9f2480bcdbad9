"""Several gated matrices per backend call: the GPU's host-time fast path.

Gating one matrix costs a few small threshold operations, an autograd node
and a kernel call on the host, whatever its size; on a GPU that host work,
not the arithmetic, is what a training step waits for. Inside
``pregated_weights`` the lobe's gated layers are gated a chunk at a time
(``SelfPinchingGate.forward_many``) on the first use of any layer of the
chunk, and the other layers pick up their gated weight. On a CPU this is
off by default; the numbers are the same either way.

Authors
 * speechbrain-spg developers 2026
"""

import contextlib

import torch
from speechbrain.utils.distributed import is_distributed_initialized

from speechbrain_spg.kernels import autocast_dtype, select_kernels

#: Matrices ``pregated_weights`` gates per call: one transformer block (q, k,
#: v, out, FFN in, FFN out). All calls have the same shapes (one compilation)
#: and each block's backward runs once its gradients are in (DDP overlap).
MATRICES_PER_CALL = 6


class _PendingChunk:
    """Consecutive layers whose weights are gated in one call, on the first
    use of any of them (see ``pregated_weights``)."""

    def __init__(self, gate, first, layers):
        self.gate, self.first, self.layers = gate, first, layers

    def pregate(self):
        """Sets ``pregated`` on every layer of the chunk."""
        weights = [layer.weight for layer in self.layers]
        dtype = autocast_dtype(weights[0])
        gated = self.gate.forward_many(self.first, weights, dtype)
        for layer, weight in zip(self.layers, gated):
            layer.set_pass_state(pregated=weight)


def default_pregating(weight):
    """Whether ``pregated_weights`` gates in chunks by default: not on CPU,
    where per-matrix host work matters little and chunks raise peak memory.

    Arguments
    ---------
    weight : torch.Tensor
        A gated weight.

    Returns
    -------
    bool

    Example
    -------
    >>> default_pregating(torch.zeros(2))
    False
    """
    return weight.device.type != "cpu"


def distributed_world_size():
    """Processes of the default ``torch.distributed`` group (1 without one).

    Returns
    -------
    int

    Example
    -------
    >>> distributed_world_size()
    1
    """
    if is_distributed_initialized():
        return torch.distributed.get_world_size()
    return 1


def matrices_per_call(gate, layers):
    """How many layers ``pregated_weights`` gates per call by default.

    All where the compiled gate runs Triton kernels in one process (host
    work once per pass); else one block, so that DDP gets gradients during
    the backward and a compilation for all matrices is not needed.

    Arguments
    ---------
    gate : SelfPinchingGate
        The gate of the layers.
    layers : list of GatedLinear
        All layers of the gate.

    Returns
    -------
    int

    Example
    -------
    >>> from speechbrain_spg.layers import GatedLinear, SelfPinchingGate
    >>> gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5, impl="compiled")
    >>> matrices_per_call(gate, [GatedLinear(torch.nn.Linear(3, 2), gate, 0)])  # CPU
    6
    """
    if gate.impl != "compiled" or distributed_world_size() != 1:
        return MATRICES_PER_CALL
    weights = [layer.weight for layer in layers]
    triton = select_kernels(weights, "compiled").name == "triton"
    return len(layers) if triton else MATRICES_PER_CALL


@contextlib.contextmanager
def pregated_weights(gate, layers, chunk=None, enabled=None):
    """Within the block, ``layers`` gate their weights ``chunk`` per call.

    With gradients on and a fused gate, a layer's first use gates its chunk
    in one call (``forward_many``): one autograd node per chunk, not per
    matrix (host time). Gating a chunk only when needed lets the backward
    free memory block by block and skips blocks LayerDrop skips. Otherwise
    (reference gate, no gradients, hard pruned) nothing changes.

    Arguments
    ---------
    gate : SelfPinchingGate
        The gate of the layers.
    layers : list of GatedLinear
        All layers of the gate, in gate order.
    chunk : int, optional
        Layers per call (default: ``matrices_per_call``).
    enabled : bool, optional
        Gate in chunks at all (default: ``default_pregating``).

    Example
    -------
    >>> from speechbrain_spg.layers import GatedLinear, SelfPinchingGate
    >>> gate = SelfPinchingGate(torch.ones(2), [0, 1], 0.05, 0.5, impl="fused")
    >>> gated = [GatedLinear(torch.nn.Linear(3, 3), gate, i) for i in range(2)]
    >>> with pregated_weights(gate, gated, enabled=True):
    ...     hidden = gated[0](torch.randn(4, 3))  # gates both
    ...     print(gated[1].pregated is not None)
    ...     y = gated[1](hidden)
    True
    >>> y.shape, gated[1].pregated is None, len(gate.soft_zeros)
    (torch.Size([4, 3]), True, 2)
    """
    active = (
        torch.is_grad_enabled()
        and gate.impl != "reference"
        and bool(layers)
        and layers[0].mask is None  # not hard pruned (no read-back)
        and (
            default_pregating(layers[0].weight) if enabled is None else enabled
        )
    )
    if active:
        if chunk is None:
            chunk = matrices_per_call(gate, layers)
        for first in range(0, len(layers), chunk):
            pending = _PendingChunk(gate, first, layers[first : first + chunk])
            for layer in pending.layers:
                layer.set_pass_state(pending=pending)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_pass_state()
