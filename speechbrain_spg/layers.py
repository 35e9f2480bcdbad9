"""Gated layers: the thresholds of the tie groups and the gated ``nn.Linear``.

``SelfPinchingGate`` holds one learnable threshold per tie group of weight
matrices (``group_indices``) and gates a matrix through the backend that
``gate_impl`` selects (``speechbrain_spg.kernels``); ``GatedLinear`` replaces
an ``nn.Linear`` of the model and multiplies with its gated weight.

Thresholds are stored in units of each matrix's weight standard deviation
(``scale``, measured once when the gate is built) and the temperature is
``tau = tau_scale * scale^2``, so one ``threshold`` and one ``tau_scale``
value mean the same thing for base and large models, and for every matrix of
a tie group.

Authors
 * speechbrain-spg developers 2026
"""

import contextlib

import torch
import torch.nn.functional as F
from speechbrain.utils.distributed import is_distributed_initialized
from torch import nn

from speechbrain_spg.kernels import (
    autocast_dtype,
    gate,
    gated_values,
    select_kernels,
)

#: Smallest weight standard deviation a gate uses as a matrix's ``scale``.
#: A matrix of (almost) only zeros, such as a layer pruned entirely in an
#: earlier compression, would otherwise give ``tau = tau_scale * scale^2 = 0``
#: in float32 and a gate of ``0 / 0``. With this floor its weights are all
#: pinched and every output and gradient stays finite.
MIN_SCALE = 1e-6

#: Matrices gated per call by ``pregated_weights``: one transformer block of
#: wav2vec2 / HuBERT / WavLM (q, k, v, out, FFN in, FFN out). Every call then
#: has the same shapes, so one compilation of the kernels serves the whole
#: model, and each block's backward runs as soon as its gradients are in
#: (memory, DDP overlap). With the Triton kernels on one GPU, all matrices
#: are gated in one call instead (``matrices_per_call``).
MATRICES_PER_CALL = 6


def group_indices(names, tie):
    """Assigns each gated matrix to a tie group.

    Arguments
    ---------
    names : list of str
        Module names of the gated matrices, in order.
    tie : str
        ``"linear"`` (one group per matrix), ``"block"`` (one per transformer
        block, read from the ``layers.<i>.`` part of the name) or ``"global"``.

    Returns
    -------
    list of int
        The group index of each matrix, numbered from 0 in order of appearance.

    Example
    -------
    >>> names = ["encoder.layers.0.q", "encoder.layers.0.k", "encoder.layers.1.q"]
    >>> group_indices(names, "linear"), group_indices(names, "block")
    ([0, 1, 2], [0, 0, 1])
    >>> group_indices(names, "global")
    [0, 0, 0]
    """
    if tie == "linear":
        return list(range(len(names)))
    if tie == "global":
        return [0] * len(names)
    if tie == "block":
        keys = [_block_key(name) for name in names]
        order = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        return [order[key] for key in keys]
    raise ValueError(
        f"tie: unknown tie mode {tie!r}; expected one of "
        "'linear', 'block', 'global'."
    )


def _block_key(name):
    """Returns the ``...layers.<i>`` prefix of a module name."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    raise ValueError(
        f"tie='block': cannot find the transformer block of module {name!r} "
        "(expected a '.layers.<index>.' part); use tie='linear' or 'global'."
    )


class HostValue:
    """The Python value of a 0-d tensor, read back only when it changed.

    Reading a GPU tensor's value (``int(t)``, ``bool(t)``) waits for the
    device. This keeps the value with the tensor's storage and version
    counter, which every in-place write (``+=``, ``fill_``,
    ``load_state_dict``, a DDP buffer broadcast) and every new tensor
    (``.to(device)``) change: then the next ``read`` reads it back once.
    Inference tensors (made under ``torch.inference_mode``) have no version
    counter: they are read back every time.

    Example
    -------
    >>> step, value = torch.tensor(3), HostValue()
    >>> value.read(step)
    3
    >>> step += 2  # a write: read back again
    >>> value.read(step)
    5
    >>> step += 1
    >>> value.wrote(step, 6)  # the writer knows the result: no read-back
    >>> value.read(step)
    6
    """

    def __init__(self):
        self._key = None
        self._value = None

    def read(self, tensor):
        """The value of ``tensor``, read back if it changed since the last
        ``read`` or ``wrote``.

        Arguments
        ---------
        tensor : torch.Tensor
            A 0-d tensor.

        Returns
        -------
        int, float or bool
        """
        if tensor.is_inference():
            return tensor.item()
        key = (tensor.data_ptr(), tensor._version)
        if key != self._key:
            self._key, self._value = key, tensor.item()
        return self._value

    def wrote(self, tensor, value):
        """Records that ``tensor`` now holds ``value`` (just written).

        Arguments
        ---------
        tensor : torch.Tensor
            The 0-d tensor just written.
        value : int, float or bool
            Its value.
        """
        if not tensor.is_inference():
            self._key = (tensor.data_ptr(), tensor._version)
            self._value = value


class SelfPinchingGate(nn.Module):
    """Learnable thresholds of the tie groups of a set of weight matrices.

    Arguments
    ---------
    scales : torch.Tensor
        Standard deviation of each gated matrix (1-D, one per matrix);
        values below ``MIN_SCALE`` are raised to it.
    groups : list of int
        Tie group of each matrix (see ``group_indices``).
    tau_scale : float
        Temperature relative to the weights' variance: ``tau = tau_scale *
        scale^2``.
    threshold_init : float
        Initial threshold, in units of each matrix's standard deviation.
    lr_scale : float
        The stored parameter is ``threshold / lr_scale``: an optimiser step of
        size ``lr`` moves the threshold by ``lr * lr_scale``. Lets one optimiser
        shared with the SSL weights move the thresholds fast enough.
    impl : str
        The backend (``kernels.select_kernels``): ``"fused"`` (eager, one
        pass that also yields the soft-zero count the regulariser needs),
        ``"compiled"`` (``torch.compile``, Triton on CUDA) or
        ``"reference"`` (the formula under autograd).
    recompute_gated : bool
        Training passes keep no gated weight for the backward pass: the
        matrix product's backward computes ``W * M`` again (``regate``) and
        the gate's backward recomputes the mask. Saves one copy of the
        gated weights in memory from the forward pass to the backward pass,
        at the cost of about one more pass over them (see ``GatedLinear``).

    Example
    -------
    >>> gate = SelfPinchingGate(torch.ones(3), [0, 0, 1], 0.05, 0.5)
    >>> gate.num_groups, gate.thresholds().tolist()
    (2, [0.5, 0.5, 0.5])
    >>> w = torch.tensor([0.1, 2.0])
    >>> gate(0, w)
    tensor([0.0083, 2.0000], grad_fn=<GateFunctionBackward>)
    """

    def __init__(
        self,
        scales,
        groups,
        tau_scale,
        threshold_init,
        lr_scale=1.0,
        impl="fused",
        recompute_gated=False,
    ):
        super().__init__()
        num_groups = max(groups) + 1
        self.tau_scale = float(tau_scale)
        self.lr_scale = float(lr_scale)
        self.impl = impl
        self.recompute_gated = bool(recompute_gated)
        self.soft_zeros = RecordedSoftZeros()
        self.threshold_param = nn.Parameter(
            torch.full((num_groups,), threshold_init / self.lr_scale)
        )
        self.register_buffer(
            "scale", scales.detach().float().clamp_min(MIN_SCALE)
        )
        self.register_buffer("group", torch.tensor(groups, dtype=torch.long))
        self.register_buffer("pruned", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        # The group of each matrix as Python ints: indexing the thresholds
        # with an element of the ``group`` buffer would read it back from
        # the device (a GPU synchronisation per gated matrix and step).
        self._groups = tuple(int(g) for g in groups)
        self.register_load_state_dict_post_hook(_read_back_groups)
        # ``step`` and ``pruned`` as Python values, read back only when
        # they change (see ``HostValue``).
        self._step_value = HostValue()
        self._pruned_value = HostValue()

    @property
    def step_count(self):
        """Training steps so far (the ``step`` buffer, checkpointed), as an
        int; read back from the device only when the buffer changed other
        than through ``advance``."""
        return int(self._step_value.read(self.step))

    def advance(self, steps=1):
        """Counts ``steps`` more training steps (negative: fewer).

        Arguments
        ---------
        steps : int
            Steps to add to ``step``.

        Example
        -------
        >>> gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5)
        >>> gate.advance(); gate.advance(); gate.advance(-1)
        >>> gate.step_count, int(gate.step)
        (1, 1)
        """
        count = self.step_count + steps
        self.step += steps
        self._step_value.wrote(self.step, count)

    @property
    def is_pruned(self):
        """Whether hard pruning fixed the masks (the ``pruned`` buffer, read
        back from the device only when it changed)."""
        return bool(self._pruned_value.read(self.pruned))

    @property
    def num_groups(self):
        """Number of learnable thresholds."""
        return self.threshold_param.numel()

    def group_thresholds(self):
        """Thresholds of the groups, in units of the weight std (1-D)."""
        return self.threshold_param * self.lr_scale

    def thresholds(self):
        """Absolute threshold of each matrix (1-D, differentiable)."""
        return self.group_thresholds()[self.group] * self.scale

    def taus(self):
        """Temperature of each matrix (1-D)."""
        return self.tau_scale * self.scale * self.scale

    def forward(
        self,
        index,
        weight,
        overwrite_grad=False,
        recompute_mask=None,
        out_dtype=None,
    ):
        """Gates one weight matrix; with gradients on, records its
        soft-zero count for the regulariser (``soft_zeros``).

        Arguments
        ---------
        index : int
            Position of the matrix in the gate.
        weight : torch.Tensor
            Its weights.
        overwrite_grad : bool
            The backward may write the weight gradient into the gradient of
            the gated weight: only for a caller that feeds the result to one
            operation and nothing else (``kernels.GateFunction``).
        recompute_mask : bool, optional
            How the backward gets the mask (default:
            ``kernels.default_recompute_mask``).
        out_dtype : torch.dtype, optional
            Return ``W * M`` in this dtype (autocast's), cast in the kernel.

        Returns
        -------
        torch.Tensor
            ``W * M``.
        """
        threshold, tau = self._threshold_and_tau(index)
        thresholds, taus = threshold.reshape(1), tau.reshape(1)
        if not torch.is_grad_enabled():
            return gated_values(
                [weight], thresholds, taus, self.impl, out_dtype
            )[0]
        zeros, (gated,) = gate(
            [weight],
            thresholds,
            taus,
            self.impl,
            True if self.recompute_gated else recompute_mask,
            out_dtype,
            overwrite_grad,
        )
        self.soft_zeros[index] = zeros[0]
        return gated

    def _threshold_and_tau(self, index):
        """Threshold and temperature of one matrix, indexed with Python ints
        only (views, no device read-back); the same arithmetic as
        ``thresholds()[index]`` and ``taus()[index]``."""
        scale = self.scale[index]
        threshold = (
            self.threshold_param[self._groups[index]] * self.lr_scale * scale
        )
        return threshold, self.tau_scale * scale * scale

    def regate(self, index, weight, out_dtype=None):
        """``W * M`` of one matrix computed again, outside autograd, with
        the backend of ``forward`` (what ``recompute_gated`` gives the
        backward pass of a matrix product).

        Arguments
        ---------
        index : int
            Position of the matrix in the gate.
        weight : torch.Tensor
            Its weights (unchanged since the forward pass).
        out_dtype : torch.dtype, optional
            The dtype ``forward`` returned (autocast's).

        Returns
        -------
        torch.Tensor
            ``W * M``, no gradient.

        Example
        -------
        >>> gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5)
        >>> w = torch.tensor([0.1, 2.0], requires_grad=True)
        >>> torch.equal(gate.regate(0, w), gate(0, w).detach())
        True
        """
        threshold, tau = self._threshold_and_tau(index)
        return gated_values(
            [weight], threshold.reshape(1), tau.reshape(1), self.impl, out_dtype
        )[0]

    def forward_many(self, first, weights, out_dtype=None):
        """Gates consecutive matrices in one call of the backend.

        Records their soft-zero counts, like ``forward``.

        Arguments
        ---------
        first : int
            Position in the gate of the first matrix.
        weights : list of torch.Tensor
            Matrices ``first``, ``first + 1``, ... of the gate.
        out_dtype : torch.dtype, optional
            Return the gated weights in this dtype (autocast's).

        Returns
        -------
        list of torch.Tensor
            ``W * M`` of every matrix.

        Example
        -------
        >>> gate = SelfPinchingGate(torch.ones(3), [0, 0, 1], 0.05, 0.5)
        >>> w = [torch.tensor([0.1, 2.0]), torch.tensor([[3.0]])]
        >>> [g.detach() for g in gate.forward_many(1, w)]
        [tensor([0.0083, 2.0000]), tensor([[3.]])]
        >>> sorted(gate.soft_zeros)
        [1, 2]
        """
        stop = first + len(weights)
        zeros, gated = gate(
            weights,
            self.thresholds()[first:stop],
            self.taus()[first:stop],
            self.impl,
            True if self.recompute_gated else None,
            out_dtype,
            overwrite_grad=True,
        )
        self.soft_zeros.update(zip(range(first, stop), zeros.unbind()))
        self.soft_zeros.calls[first] = zeros
        return gated

    def recorded_soft_zero_vector(self, count):
        """The soft-zero counts of all matrices, if one call gated them all
        in this forward pass (``pregated_weights`` with one chunk).

        Taking them whole saves splitting them into one tensor per matrix
        and stacking them again, forward and backward (host time).

        Arguments
        ---------
        count : int
            Number of gated matrices.

        Returns
        -------
        torch.Tensor or None
            1-D, ``count`` counts (differentiable in the thresholds), or
            None.

        Example
        -------
        >>> gate = SelfPinchingGate(torch.ones(2), [0, 1], 0.05, 0.5, impl="fused")
        >>> _ = gate.forward_many(0, [torch.ones(2), torch.zeros(3)])
        >>> [round(x, 3) for x in gate.recorded_soft_zero_vector(2).tolist()]
        [0.001, 2.772]
        >>> gate.soft_zeros.clear()
        >>> gate.recorded_soft_zero_vector(2) is None
        True
        """
        vector = self.soft_zeros.calls.get(0)
        if vector is None or vector.numel() != count:
            return None
        return vector

    def recorded_soft_zeros(self, count):
        """Soft-zero counts recorded in this forward pass.

        Arguments
        ---------
        count : int
            Number of gated matrices.

        Returns
        -------
        dict
            Index -> count (differentiable in the thresholds) of the matrices
            the last forward pass gated (all of them when they were gated
            at once, ``pregated_weights``); matrices gated one at a time
            that it did not use (a block skipped by LayerDrop) and passes
            without gradients record nothing.
        """
        return {
            i: self.soft_zeros[i] for i in range(count) if i in self.soft_zeros
        }


class RecordedSoftZeros(dict):
    """Soft-zero counts recorded in a forward pass: index -> count, and in
    ``calls`` the count vector of each call that gated several matrices
    (first index -> vector). ``clear`` empties both.

    Example
    -------
    >>> record = RecordedSoftZeros()
    >>> record[0] = torch.tensor(1.0)
    >>> record.calls[0] = torch.ones(1)
    >>> record.clear()
    >>> len(record), len(record.calls)
    (0, 0)
    """

    def __init__(self):
        super().__init__()
        self.calls = {}

    def clear(self):
        """Forgets every recorded count."""
        super().clear()
        self.calls.clear()


class _PendingChunk:
    """Consecutive layers of a gate whose weights are gated in one call, on
    the first use of any of them (see ``pregated_weights``)."""

    def __init__(self, gate, first, layers):
        self.gate, self.first, self.layers = gate, first, layers

    def pregate(self):
        """Sets ``pregated`` on every layer of the chunk."""
        weights = [layer.weight for layer in self.layers]
        gated = self.gate.forward_many(
            self.first, weights, autocast_dtype(weights[0])
        )
        for layer, weight in zip(self.layers, gated):
            layer.set_pass_state(pregated=weight)


def default_pregating(weight):
    """Whether ``pregated_weights`` gates in chunks by default.

    Arguments
    ---------
    weight : torch.Tensor
        A gated weight.

    Returns
    -------
    bool
        True off the CPU: on a GPU the host work per gated matrix is what
        slows the step. False on CPU, where that work is a small part of a
        step and chunks would raise the peak resident memory.

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

    Arguments
    ---------
    gate : SelfPinchingGate
        The gate of the layers.
    layers : list of GatedLinear
        All layers of the gate.

    Returns
    -------
    int
        All layers in one call where the compiled gate runs the Triton
        kernels (float32 weights on a GPU) in a single process: its host
        work is then paid once per pass, not once per block. The price:
        the gate's backward runs at the end of the backward pass, so the
        gradients of the gated weights all stay until then and DDP would
        have nothing to overlap with the backward pass. With several
        processes, and without the Triton kernels (a compilation for all
        matrices at once is slow), ``MATRICES_PER_CALL``.

    Example
    -------
    >>> layers = [nn.Linear(3, 2), nn.Linear(2, 1)]
    >>> gate = SelfPinchingGate(torch.ones(2), [0, 1], 0.05, 0.5, impl="compiled")
    >>> gated = [GatedLinear(layer, gate, i) for i, layer in enumerate(layers)]
    >>> matrices_per_call(gate, gated)  # CPU weights: no Triton kernels
    6
    """
    if (
        gate.impl == "compiled"
        and distributed_world_size() == 1
        and select_kernels([layer.weight for layer in layers], "compiled").name
        == "triton"
    ):
        return len(layers)
    return MATRICES_PER_CALL


@contextlib.contextmanager
def pregated_weights(gate, layers, chunk=None, enabled=None):
    """Within the block, ``layers`` gate their weights ``chunk`` per call.

    With gradients on and a fused gate (``impl`` ``"fused"`` or
    ``"compiled"``), the first use of a layer gates its whole chunk of
    consecutive layers in one call (``SelfPinchingGate.forward_many``; in
    the autocast dtype under autocast), and the other layers of the chunk
    pick up their gated weight: one autograd node and one kernel call per
    chunk instead of per matrix, which is what costs host time. Gating a
    chunk when it is first needed, not all chunks up front, keeps the
    backward freeing memory block by block (the autograd engine runs a
    node made early only after all nodes made after it). A chunk never
    used (a block skipped by LayerDrop) is never gated, as on the other
    paths; in a chunk of all layers, a skipped block's matrices are gated
    but unused: they get no weight gradient, and their soft-zero counts
    are the numbers the separate soft-zeros pass would give. Otherwise
    (reference gate, no gradients, hard-pruned layers) the block runs
    unchanged.

    Arguments
    ---------
    gate : SelfPinchingGate
        The gate of the layers.
    layers : list of GatedLinear
        All layers of the gate, in gate order.
    chunk : int, optional
        Layers per call (default: ``matrices_per_call``, i.e.
        ``MATRICES_PER_CALL``, or all of them with the Triton kernels on
        one GPU).
    enabled : bool, optional
        Gate in chunks at all (default: ``default_pregating``, i.e. not on
        CPU).

    Example
    -------
    >>> layers = [nn.Linear(3, 2), nn.Linear(2, 1)]
    >>> gate = SelfPinchingGate(torch.ones(2), [0, 1], 0.05, 0.5, impl="fused")
    >>> gated = [GatedLinear(layer, gate, i) for i, layer in enumerate(layers)]
    >>> with pregated_weights(gate, gated, enabled=True):
    ...     hidden = gated[0](torch.randn(4, 3))
    ...     print(gated[1].pregated is not None)
    ...     y = gated[1](hidden)
    True
    >>> y.shape, gated[1].pregated is None, len(gate.soft_zeros)
    (torch.Size([4, 1]), True, 2)
    """
    active = (
        torch.is_grad_enabled()
        and gate.impl != "reference"
        and bool(layers)
        # Hard-pruned layers use fixed masks (checked without reading the
        # ``pruned`` buffer back from the device).
        and layers[0].mask is None
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


def _read_back_groups(gate, incompatible_keys):
    """After ``load_state_dict``, the Python copy of the ``group`` buffer."""
    gate._groups = tuple(gate.group.tolist())


class GatedLinear(nn.Linear):
    """A ``nn.Linear`` whose weight goes through a self-pinching gate.

    It shares the ``weight`` and ``bias`` parameters of the layer it replaces,
    so state-dict keys are unchanged. Before hard pruning it uses the soft
    gated weight; after, the fixed binary ``mask`` (kept weights only, also
    during further fine-tuning). In eval mode without gradients the effective
    weight is cached until the weight or the thresholds change.

    Arguments
    ---------
    linear : nn.Linear
        The layer to gate.
    gate : SelfPinchingGate
        The gate holding the thresholds (not registered as a submodule).
    index : int
        Position of this matrix in the gate.

    Example
    -------
    >>> layer = nn.Linear(4, 2)
    >>> gate = SelfPinchingGate(layer.weight.std().reshape(1), [0], 0.05, 1.0)
    >>> gated = GatedLinear(layer, gate, 0)
    >>> gated(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    """

    def __init__(self, linear, gate, index):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.index = index
        object.__setattr__(self, "gate", gate)
        self.register_buffer("mask", None, persistent=False)
        # Set for one training forward pass by ``pregated_weights``: the
        # chunk of layers to gate on first use, then the gated weight.
        self.pending = None
        self.pregated = None
        self._cache = None
        self.register_state_dict_post_hook(_save_pruned_weights_as_zeros)

    def set_pass_state(self, pending=None, pregated=None):
        """Sets the state ``pregated_weights`` gives the layer for one
        forward pass: the chunk to gate on first use, or the gated weight.

        They are plain attributes: set without ``nn.Module.__setattr__``,
        whose checks for parameters, buffers and submodules run several
        times per layer and step (host time).

        Arguments
        ---------
        pending : _PendingChunk, optional
            The chunk that gates this layer's weight on first use.
        pregated : torch.Tensor, optional
            This layer's gated weight for the pass.

        Example
        -------
        >>> gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 0.5)
        >>> layer = GatedLinear(nn.Linear(2, 2), gate, 0)
        >>> layer.set_pass_state(pregated=torch.zeros(2, 2))
        >>> layer(torch.ones(1, 2)) - layer.bias
        tensor([[0., 0.]], grad_fn=<SubBackward0>)
        >>> layer.set_pass_state()
        >>> layer.pending is None and layer.pregated is None
        True
        """
        object.__setattr__(self, "pending", pending)
        object.__setattr__(self, "pregated", pregated)

    def effective_weight(
        self, overwrite_grad=False, recompute_mask=None, out_dtype=None
    ):
        """The weight the layer multiplies with: gated, or masked if pruned.

        Arguments
        ---------
        overwrite_grad : bool
            Passed to the gate: the result feeds one matrix product only.
        recompute_mask : bool, optional
            Passed to the gate (see ``kernels.GateFunction``).
        out_dtype : torch.dtype, optional
            Passed to the gate: the dtype the fused paths return.

        Returns
        -------
        torch.Tensor
            Same shape as ``weight``.
        """
        if self.mask is not None:
            return self.weight * self.mask
        if self.pending is not None:
            self.pending.pregate()
        if self.pregated is not None:
            return self.pregated
        return self.gate(
            self.index, self.weight, overwrite_grad, recompute_mask, out_dtype
        )

    def forward(self, x):
        """Linear transform with the effective weight.

        Arguments
        ---------
        x : torch.Tensor
            Input features (..., in_features).

        Returns
        -------
        torch.Tensor
            Output features (..., out_features).
        """
        # Within ``pregated_weights`` (training, gradients on, not pruned):
        # the gated weight of this pass, in the autocast dtype; checked
        # first, as this runs once per gated matrix and step (host time).
        weight = self.pregated
        if weight is None and self.pending is not None:
            self.pending.pregate()
            weight = self.pregated
        if weight is not None and not self.gate.recompute_gated:
            if self._cache is not None:
                self._cache = None
            return F.linear(x, weight, self.bias)
        # Under autocast the product would cast the float32 gated weight in
        # a pass of its own: the gate returns it in the autocast dtype.
        dtype = autocast_dtype(self.weight)
        if self.training or torch.is_grad_enabled():
            if self._cache is not None:
                self._cache = None
            # The product keeps the gated weight for its backward only if
            # x needs a gradient; otherwise reading the mask back from it
            # would keep it alive just for that: recompute instead.
            weight = self.effective_weight(
                overwrite_grad=True,
                recompute_mask=None if x.requires_grad else True,
                out_dtype=dtype,
            )
            if not (
                self.gate.recompute_gated
                and self.mask is None
                and weight.requires_grad
                and weight.is_contiguous()
            ):
                return F.linear(x, weight, self.bias)
            hooks = _RegateHooks(self, weight, dtype)
            with torch.autograd.graph.saved_tensors_hooks(
                hooks.pack, hooks.unpack
            ):
                return F.linear(x, weight, self.bias)
        if (
            self.weight.is_inference()
            or self.gate.threshold_param.is_inference()
        ):
            # Made under torch.inference_mode: no version counters tell a
            # change, so nothing is cached.
            return F.linear(x, self._eval_weight(dtype), self.bias)
        key = (
            self.weight._version,
            self.weight.data_ptr(),
            self.gate.threshold_param._version,
            self.mask is None,
            dtype,
        )
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._eval_weight(dtype))
        return F.linear(x, self._cache[1], self.bias)

    def _eval_weight(self, dtype):
        """The effective weight, cast to ``dtype`` if given."""
        weight = self.effective_weight()
        return weight if dtype is None else weight.to(dtype)

    def extra_repr(self):
        """Shows the gate position next to the layer sizes."""
        return super().extra_repr() + f", gate_index={self.index}"


class _RegateHooks:
    """Saved-tensor hooks of one matrix product with a gated weight: what
    autograd would keep of the gated weight (itself or a view) is kept as
    its shape only, and computed again (``SelfPinchingGate.regate``) when
    the backward pass needs it."""

    def __init__(self, layer, gated, out_dtype):
        self.layer, self.out_dtype = layer, out_dtype
        self.storage = gated.untyped_storage().data_ptr()
        self.dtype = gated.dtype

    def pack(self, tensor):
        """A view of the gated weight becomes its layout; anything else
        is kept."""
        if (
            tensor.dtype == self.dtype
            and tensor.untyped_storage().data_ptr() == self.storage
        ):
            return (tensor.size(), tensor.stride(), tensor.storage_offset())
        return tensor

    def unpack(self, packed):
        """The gated weight computed again, in the saved view's layout."""
        if isinstance(packed, torch.Tensor):
            return packed
        layer = self.layer
        gated = layer.gate.regate(layer.index, layer.weight, self.out_dtype)
        return gated.as_strided(*packed)


def _save_pruned_weights_as_zeros(module, state_dict, prefix, local_metadata):
    """State-dict hook: a pruned layer's saved weight has exact zeros.

    After hard pruning, an optimiser that carries momentum from before can
    move the stored weights at pruned positions away from zero (the forward
    pass masks them, so the model is unaffected). The mask is not saved; it
    is rebuilt from the zeros when a checkpoint is loaded, so the saved
    weight must carry them.
    """
    key = prefix + "weight"
    if module.mask is not None and key in state_dict:
        state_dict[key] = state_dict[key].detach() * module.mask
