"""Gated layers: the thresholds of the tie groups and the gated ``nn.Linear``.

Thresholds are in units of each matrix's weight standard deviation
(``scale``) and ``tau = tau_scale * scale^2``, so that one ``threshold`` and
one ``tau_scale`` mean the same for any model size and any matrix of a group.

Authors
 * speechbrain-spg developers 2026
"""

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_spg.kernels import (
    autocast_dtype,
    gate_matrices,
    gated_values,
)

#: Smallest ``scale``: an all-zero matrix (pruned in an earlier compression)
#: would otherwise give ``tau = 0`` and a gate of ``0 / 0``.
MIN_SCALE = 1e-6


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
    >>> [group_indices(names, tie) for tie in ("linear", "block", "global")]
    [[0, 1, 2], [0, 0, 1], [0, 0, 0]]
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

    Reading a GPU tensor's value waits for the device. The value is kept
    with the tensor's storage and version counter, which in-place writes
    and new tensors change; inference tensors have no version counter and
    are read back every time.

    Example
    -------
    >>> step, value = torch.tensor(3), HostValue()
    >>> value.read(step), value.read(step.add_(2))  # a write: read again
    (3, 5)
    >>> value.wrote(step.add_(1), 6); value.read(step)  # known: no read-back
    6
    """

    def __init__(self):
        self._key = self._value = None

    def read(self, tensor):
        """The value of the 0-d ``tensor``, read back if it changed since
        the last ``read`` or ``wrote``.

        Arguments
        ---------
        tensor : torch.Tensor

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
        """Records that the 0-d ``tensor`` was just set to ``value``.

        Arguments
        ---------
        tensor : torch.Tensor
        value : int, float or bool
        """
        if not tensor.is_inference():
            self._key, self._value = (tensor.data_ptr(), tensor._version), value


class SelfPinchingGate(nn.Module):
    """Learnable thresholds of the tie groups of a set of weight matrices.

    Arguments
    ---------
    scales : torch.Tensor
        Standard deviation of each matrix (1-D; at least ``MIN_SCALE``).
    groups : list of int
        Tie group of each matrix (see ``group_indices``).
    tau_scale : float
        ``tau = tau_scale * scale^2``.
    threshold_init : float
        Initial threshold, in units of each matrix's standard deviation.
    lr_scale : float
        The parameter is ``threshold / lr_scale``, so that an optimiser
        shared with the SSL weights moves thresholds fast enough.
    impl : str
        The backend (``kernels.select_kernels``): ``"fused"``,
        ``"compiled"`` or ``"reference"`` (the formula under autograd).
    recompute_gated : bool
        Keep no gated weight for the backward, which computes it again
        (``regate``): less memory, one more pass over the weights.

    Example
    -------
    >>> gate = SelfPinchingGate(torch.ones(3), [0, 0, 1], 0.05, 0.5)
    >>> gate.num_groups, gate.thresholds().tolist()
    (2, [0.5, 0.5, 0.5])
    >>> w = torch.tensor([0.1, 2.0])
    >>> gate(0, w)
    tensor([0.0083, 2.0000], grad_fn=<GateFunctionBackward>)
    >>> torch.equal(gate.regate(0, w), gate(0, w).detach())
    True
    >>> _ = gate.forward_many(0, [w, w, torch.zeros(3)])
    >>> gate.recorded_soft_zero_vector(3).detach()
    tensor([0.9168, 0.9168, 2.7724])
    >>> gate.advance(); gate.advance(); gate.advance(-1)
    >>> gate.step_count, int(gate.step)
    (1, 1)
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
        self.tau_scale, self.lr_scale = float(tau_scale), float(lr_scale)
        self.impl, self.recompute_gated = impl, bool(recompute_gated)
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
        # Python copies, so that no step reads a buffer back from the device.
        self._groups = tuple(int(g) for g in groups)
        self.register_load_state_dict_post_hook(_read_back_groups)
        self._step_value, self._pruned_value = HostValue(), HostValue()

    @property
    def step_count(self):
        """Training steps so far (the checkpointed ``step`` buffer), int."""
        return int(self._step_value.read(self.step))

    def advance(self, steps=1):
        """Counts ``steps`` more training steps (negative: fewer).

        Arguments
        ---------
        steps : int
        """
        count = self.step_count + steps
        self.step += steps
        self._step_value.wrote(self.step, count)

    @property
    def is_pruned(self):
        """Whether hard pruning fixed the masks (the ``pruned`` buffer)."""
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
        """``W * M``; with gradients on, the soft-zero count is recorded in
        ``soft_zeros`` for the regulariser.

        Arguments
        ---------
        index : int
            Position of the matrix in the gate.
        weight : torch.Tensor
            Its weights.
        overwrite_grad, recompute_mask, out_dtype
            As in ``kernels.gate_matrices`` (``recompute_gated`` forces
            ``recompute_mask``); ``out_dtype`` is autocast's.

        Returns
        -------
        torch.Tensor
        """
        if not torch.is_grad_enabled():
            return self.regate(index, weight, out_dtype)
        t, tau = (x.reshape(1) for x in self._threshold_and_tau(index))
        recompute = True if self.recompute_gated else recompute_mask
        zeros, (gated,) = gate_matrices(
            [weight], t, tau, self.impl, recompute, out_dtype, overwrite_grad
        )
        self.soft_zeros[index] = zeros[0]
        return gated

    def _threshold_and_tau(self, index):
        """``thresholds()[index]`` and ``taus()[index]`` (same arithmetic),
        indexed with Python ints only: no device read-back."""
        scale = self.scale[index]
        threshold = (
            self.threshold_param[self._groups[index]] * self.lr_scale * scale
        )
        return threshold, self.tau_scale * scale * scale

    def regate(self, index, weight, out_dtype=None):
        """``W * M`` without autograd (evaluation, ``recompute_gated``).

        Arguments
        ---------
        index, weight, out_dtype
            As in ``forward`` (``weight`` unchanged since).

        Returns
        -------
        torch.Tensor
        """
        threshold, tau = self._threshold_and_tau(index)
        return gated_values(
            [weight], threshold.reshape(1), tau.reshape(1), self.impl, out_dtype
        )[0]

    def forward_many(self, first, weights, out_dtype=None):
        """``forward`` of matrices ``first``, ``first + 1``, ... in one call.

        Arguments
        ---------
        first : int
            Position in the gate of the first matrix.
        weights : list of torch.Tensor
            The matrices.
        out_dtype : torch.dtype, optional
            As in ``forward``.

        Returns
        -------
        list of torch.Tensor
        """
        stop = first + len(weights)
        t, tau = self.thresholds()[first:stop], self.taus()[first:stop]
        recompute = True if self.recompute_gated else None
        # overwrite_grad=True: each gated weight feeds one product only.
        zeros, gated = gate_matrices(
            weights, t, tau, self.impl, recompute, out_dtype, True
        )
        self.soft_zeros.update(zip(range(first, stop), zeros.unbind()))
        self.soft_zeros.calls[first] = zeros
        return gated

    def recorded_soft_zero_vector(self, count):
        """All ``count`` soft-zero counts as one vector (not split, stacked
        again) if one call gated them in this pass, else None.

        Arguments
        ---------
        count : int
            Number of gated matrices.

        Returns
        -------
        torch.Tensor or None
        """
        vector = self.soft_zeros.calls.get(0)
        return None if vector is None or vector.numel() != count else vector

    def recorded_soft_zeros(self, count):
        """Soft-zero counts of the matrices this pass gated with gradients.

        Arguments
        ---------
        count : int
            As in ``recorded_soft_zero_vector``.

        Returns
        -------
        dict
            Index -> count; none for a matrix gated alone and unused.
        """
        return {
            i: self.soft_zeros[i] for i in range(count) if i in self.soft_zeros
        }


class RecordedSoftZeros(dict):
    """Soft-zero counts of a pass (index -> count); ``calls``: the vector of
    each call that gated several matrices (first index -> vector).

    Example
    -------
    >>> record = RecordedSoftZeros()
    >>> record[0], record.calls[0] = torch.tensor(1.0), torch.ones(1)
    >>> record.clear(); len(record), len(record.calls)
    (0, 0)
    """

    def __init__(self):
        super().__init__()
        self.calls = {}

    def clear(self):
        """Forgets every recorded count."""
        super().clear()
        self.calls.clear()


def _read_back_groups(gate, incompatible_keys):
    """After ``load_state_dict``, the Python copy of the ``group`` buffer."""
    gate._groups = tuple(gate.group.tolist())


class GatedLinear(nn.Linear):
    """A ``nn.Linear`` whose weight goes through a self-pinching gate.

    It shares the replaced layer's ``weight`` and ``bias`` (same state-dict
    keys). After hard pruning a fixed binary ``mask`` replaces the gate.
    Without gradients in eval mode the effective weight is cached until the
    weight or the thresholds change.

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
    >>> GatedLinear(layer, gate, 0)(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    """

    def __init__(self, linear, gate, index):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.index = index
        object.__setattr__(self, "gate", gate)
        self.register_buffer("mask", None, persistent=False)
        # Row-gated structured layers also fix their bias (weight gates: None).
        self.register_buffer("bias_mask", None, persistent=False)
        self.pending = self.pregated = self._cache = None
        self.register_state_dict_post_hook(_save_pruned_weights_as_zeros)

    def set_pass_state(self, pending=None, pregated=None):
        """What ``kernels.chunks.pregated_weights`` gives the layer for one pass (plain
        attributes, past ``nn.Module.__setattr__``'s checks: host time).

        Arguments
        ---------
        pending : _PendingChunk, optional
            The chunk that gates this layer's weight on first use.
        pregated : torch.Tensor, optional
            This layer's gated weight for the pass.
        """
        object.__setattr__(self, "pending", pending)
        object.__setattr__(self, "pregated", pregated)

    def effective_weight(
        self, overwrite_grad=False, recompute_mask=None, out_dtype=None
    ):
        """The weight the layer multiplies with: gated, or masked if pruned.

        Arguments
        ---------
        overwrite_grad, recompute_mask, out_dtype
            Passed to the gate (see ``SelfPinchingGate.forward``).

        Returns
        -------
        torch.Tensor
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
        # The pass's weight from ``chunks.pregated_weights`` first (host time).
        weight = self.pregated
        if weight is None and self.pending is not None:
            self.pending.pregate()
            weight = self.pregated
        if weight is not None and not self.gate.recompute_gated:
            if self._cache is not None:
                self._cache = None
            return F.linear(x, weight, self.bias)
        # The gate returns autocast's dtype: no separate cast by the product.
        dtype = autocast_dtype(self.weight)
        if self.training or torch.is_grad_enabled():
            if self._cache is not None:
                self._cache = None
            # The product keeps the gated weight only if x needs a gradient.
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
            with _RegateHooks(self, weight, dtype):
                return F.linear(x, weight, self.bias)
        w, t = self.weight, self.gate.threshold_param
        if w.is_inference() or t.is_inference():
            # No version counters to tell a change: nothing is cached.
            return F.linear(x, self._eval_weight(dtype), self.bias)
        key = (w._version, w.data_ptr(), t._version, self.mask is None, dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._eval_weight(dtype))
        return F.linear(x, self._cache[1], self.bias)

    def effective_bias(self):
        """The bias the layer adds (weight gates leave it as it is).

        Returns
        -------
        torch.Tensor or None
        """
        return self.bias

    def fix_mask(self, mask):
        """Fixes a hard mask for good: the pruned weights become zero and
        stay out of the product.

        Arguments
        ---------
        mask : torch.Tensor
            Boolean, ``True`` where kept.
        """
        with torch.no_grad():
            self.weight.mul_(mask)
        self.mask = mask.to(torch.bool)

    def _eval_weight(self, dtype):
        """The effective weight, cast to ``dtype`` if given."""
        weight = self.effective_weight()
        return weight if dtype is None else weight.to(dtype)

    def extra_repr(self):
        """Shows the gate position next to the layer sizes."""
        return super().extra_repr() + f", gate_index={self.index}"


class _RegateHooks(torch.autograd.graph.saved_tensors_hooks):
    """Autograd keeps only the layout of (views of) the gated weight of one
    product, and computes it again for the backward (``regate``)."""

    def __init__(self, layer, gated, out_dtype):
        super().__init__(self.pack, self.unpack)
        self.layer, self.out_dtype = layer, out_dtype
        self.storage = gated.untyped_storage().data_ptr()
        self.dtype = gated.dtype

    def pack(self, tensor):
        """A view of the gated weight becomes its layout; else kept."""
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
    """State-dict hook: a pruned layer saves exact zeros (momentum may have
    moved its pruned weights and biases), from which loading rebuilds the
    masks."""
    for name, mask in (("weight", module.mask), ("bias", module.bias_mask)):
        key = prefix + name
        if mask is not None and key in state_dict:
            state_dict[key] = state_dict[key].detach() * mask
