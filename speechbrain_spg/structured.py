"""Structured self-pinching gates: whole attention heads and feed-forward units.

With ``granularity: structured`` a gate does not decide about single
weights but about units that can then be cut out of the matrices, so that
the exported model is smaller in its shapes and faster:

- an attention head: its ``head_dim`` rows of ``q_proj``, ``k_proj`` and
  ``v_proj`` (with their biases) and its ``head_dim`` columns of
  ``out_proj``;
- a feed-forward unit: one row of ``intermediate_dense`` (with its bias) and
  the matching column of ``output_dense``.

A unit's norm is the root mean square of its weights, each in units of its
matrix's standard deviation (q, k, v and out weigh alike). Its score ``s``
is that norm in units of the spread (standard deviation) of its sub-layer's
unit norms at the start: a head averages tens of thousands of weights and a
feed-forward unit a few hundred, so head norms lie much closer together,
and only in units of their spread do the scores of both mean the same.

The unit is used as ``W * M`` with the formula of ``speechbrain_spg.gate``,
``M = sigmoid((s^2 - t^2) / (2 tau))``, with ``tau = tau_scale * c`` (``c``:
the sub-layer's mean score), so that the gate is ``tau_scale`` spreads wide
in every sub-layer. Each sub-layer's threshold is ``t = b + theta``: ``b``
its mean score at the start less ``BASE_SPREADS`` spreads, ``theta`` one
learnable value per tie group of sub-layers (``tie: linear``: one per
block's attention and one per block's feed-forward; ``block``: per block;
``global``: one), starting at ``-threshold_init``. A shared step of the
controller then removes about the same fraction of every sub-layer's units
(as UMP does), and the task loss moves the thresholds apart. Starting from
each sub-layer's weakest unit instead removed heads first: of a handful of
heads the weakest lies about one spread below their mean, of hundreds of
feed-forward units about three (measured on the synthetic study).

The controllers count the gated weights of each unit, so the target is
still the fraction of gated weights removed. Pruning keeps the units with
``s > t``; ``speechbrain_spg.shrink`` then removes the others from the
shapes. These choices are this project's, not the SPG paper's.

Authors
 * speechbrain-spg developers 2026
"""

import dataclasses

import torch
import torch.nn.functional as F

from speechbrain_spg.gate import hard_mask_of_square, soft_mask_of_square
from speechbrain_spg.layers import MIN_SCALE, GatedLinear, SelfPinchingGate

#: Where a structured threshold's range starts: its sub-layer's mean unit
#: score less this many spreads (at least 0).
BASE_SPREADS = 3.0

#: The linears of each kind of sub-layer and the axis their units run along
#: (0: rows, the output features; 1: columns, the input features).
SUBLAYER_LINEARS = {
    "attention": {"q_proj": 0, "k_proj": 0, "v_proj": 0, "out_proj": 1},
    "feed_forward": {"intermediate_dense": 0, "output_dense": 1},
}


@dataclasses.dataclass(frozen=True)
class SubLayer:
    """One gated sub-layer: a block's attention or its feed-forward.

    Arguments
    ---------
    name : str
        Module name (``encoder.layers.3.attention``).
    linears : tuple of int
        Positions of its matrices among the gated ones.
    axes : tuple of int
        Axis of each matrix along which its units run.
    unit_size : int
        Rows (or columns) per unit: the head size, or 1.
    units : int
        Number of heads or feed-forward units.
    unit_params : int
        Gated weights per unit (over all its matrices).
    """

    name: str
    linears: tuple
    axes: tuple
    unit_size: int
    units: int
    unit_params: int


def find_sublayers(model, found):
    """Groups the gated linears into the sub-layers they belong to.

    Arguments
    ---------
    model : nn.Module
        The HuggingFace model.
    found : list of (str, nn.Linear)
        The gated linears, in gate order (``lobes.find_prunable_linears``).

    Returns
    -------
    list of SubLayer
        In order of first appearance (else ``ValueError``: a linear that is
        not part of an attention or feed-forward sub-layer, or a sub-layer
        of which only some linears are gated).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import build_config, build_model, TINY_OVERRIDES
    >>> model = build_model(build_config("wav2vec2", **TINY_OVERRIDES))
    >>> names = [f"encoder.layers.0.feed_forward.{n}" for n in ("intermediate_dense", "output_dense")]
    >>> find_sublayers(model, [(n, model.get_submodule(n)) for n in names])[0].units
    64
    """
    positions = {}
    for index, (name, _) in enumerate(found):
        parent, _, child = name.rpartition(".")
        kind = parent.rpartition(".")[2]
        if child not in SUBLAYER_LINEARS.get(kind, {}):
            raise ValueError(
                f"granularity: structured gates whole attention heads and "
                f"feed-forward units, but the gated module {name!r} is not a "
                "q/k/v/out_proj of an attention or an intermediate/output_dense "
                "of a feed_forward; leave prune_modules at its default."
            )
        positions.setdefault(parent, {})[child] = index
    sublayers = []
    for parent, children in positions.items():
        kind = parent.rpartition(".")[2]
        expected = SUBLAYER_LINEARS[kind]
        if set(children) != set(expected):
            missing = sorted(set(expected) - set(children))
            raise ValueError(
                f"granularity: structured removes whole units, so every "
                f"linear of {parent!r} must be gated; prune_modules leaves "
                f"out {missing}. Select all of {sorted(expected)}, or use "
                "granularity: weight."
            )
        order = tuple(children[child] for child in expected)
        module = model.get_submodule(parent)
        unit_size = module.head_dim if kind == "attention" else 1
        weights = [found[i][1].weight for i in order]
        units = weights[0].shape[0] // unit_size
        numel = sum(w.numel() for w in weights)
        sublayers.append(
            SubLayer(
                parent,
                order,
                tuple(expected.values()),
                unit_size,
                units,
                numel // units,
            )
        )
    return sublayers


def unit_squares(weights, axes, unit_size, scales):
    """The score ``s^2`` of every unit of a sub-layer: the mean square of
    its weights, each divided by its matrix's standard deviation.

    Arguments
    ---------
    weights : list of torch.Tensor
        The sub-layer's matrices.
    axes : tuple of int
        The axis of each along which the units run.
    unit_size : int
        Rows (or columns) per unit.
    scales : list of torch.Tensor or float
        Standard deviation of each matrix.

    Returns
    -------
    torch.Tensor
        1-D, one score per unit (differentiable in the weights).

    Example
    -------
    >>> rows, cols = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 0.0]])
    >>> unit_squares([rows, cols], (0, 1), 1, [1.0, 1.0])  # (1+9)/2, (4+0)/2
    tensor([5., 2.])
    """
    total = 0
    for weight, axis, scale in zip(weights, axes, scales):
        square = (weight.float() / scale).square()
        if axis == 0:
            total = total + square.reshape(-1, unit_size * weight.shape[1]).sum(
                1
            )
        else:
            units = square.reshape(weight.shape[0], -1, unit_size)
            total = total + units.sum((0, 2))
    units = total.numel()
    return total * units / sum(w.numel() for w in weights)


def unit_broadcast(unit_mask, axis, unit_size):
    """A per-unit vector shaped to multiply the matrix (or bias) it gates.

    Arguments
    ---------
    unit_mask : torch.Tensor
        One value per unit.
    axis : int
        0: the units are rows (a column vector is returned); 1: columns.
    unit_size : int
        Rows (or columns) per unit.

    Returns
    -------
    torch.Tensor
        ``(rows, 1)`` or ``(1, columns)``.

    Example
    -------
    >>> unit_broadcast(torch.tensor([1.0, 0.0]), 1, 2)
    tensor([[1., 1., 0., 0.]])
    """
    expanded = unit_mask.repeat_interleave(unit_size)
    return expanded[:, None] if axis == 0 else expanded[None, :]


class StructuredGate(SelfPinchingGate):
    """Learnable thresholds of the tie groups of gated sub-layers.

    Its entries are sub-layers, not matrices: ``thresholds()`` and
    ``taus()`` have one value per sub-layer, and ``soft_zeros`` records,
    per sub-layer, the soft count of gated weights removed.

    Arguments
    ---------
    sublayers : list of SubLayer
        The gated sub-layers.
    scales : torch.Tensor
        Standard deviation of every gated matrix (1-D, gate order).
    norms : list of torch.Tensor
        The unit norms of every sub-layer at the start (``unit_squares``'s
        square roots): they fix each sub-layer's spread, mean and lowest
        score.
    groups : list of int
        Tie group of each sub-layer.
    tau_scale, threshold_init, lr_scale
        As in ``SelfPinchingGate`` (``threshold_init``: in spreads below
        each sub-layer's mean score less ``BASE_SPREADS``).

    Example
    -------
    >>> sub = SubLayer("ff", (0, 1), (0, 1), 1, 2, 2)
    >>> w = [torch.tensor([[0.5], [2.0]]), torch.tensor([[0.5, 2.0]])]
    >>> norms = [unit_squares(w, sub.axes, 1, [1.0, 1.0]).sqrt()]  # 0.5, 2
    >>> gate = StructuredGate([sub], torch.ones(2), norms, [0], 0.01, 0.25)
    >>> gate.squares(0, w).sqrt()  # in spreads (1.06)
    tensor([0.4714, 1.8856])
    >>> gate.thresholds().detach()  # mean score - 3 - 0.25, at least 0
    tensor([0.])
    >>> with torch.no_grad():
    ...     _ = gate.threshold_param.fill_(1.0)  # t = 1
    >>> gate.unit_mask(0, w).detach().round(decimals=3)
    tensor([0., 1.])
    >>> gate.soft_zeros[0].detach().round(decimals=3)  # one unit of 2 weights
    tensor(2.)
    """

    def __init__(
        self,
        sublayers,
        scales,
        norms,
        groups,
        tau_scale,
        threshold_init,
        lr_scale=1.0,
    ):
        super().__init__(
            torch.ones(len(sublayers)),
            groups,
            tau_scale,
            -threshold_init,
            lr_scale=lr_scale,
            impl="reference",
        )
        self.sublayers = tuple(sublayers)
        self.register_buffer(
            "weight_scale", scales.float().clamp_min(MIN_SCALE)
        )
        spreads = [_spread(n.float()) for n in norms]
        self.register_buffer("spread", torch.stack(spreads))
        scores = [n.float() / s for n, s in zip(norms, spreads)]
        base = [(x.mean() - BASE_SPREADS).clamp_min(0) for x in scores]
        self.register_buffer("base", torch.stack(base))
        self.register_buffer("center", torch.stack([x.mean() for x in scores]))
        sublayer_of = [0] * len(scales)
        for index, sub in enumerate(self.sublayers):
            for position in sub.linears:
                sublayer_of[position] = index
        self.register_buffer("matrix_sublayer", torch.tensor(sublayer_of))
        self.register_buffer(
            "unit_params",
            torch.tensor([float(s.unit_params) for s in self.sublayers]),
        )

    def thresholds(self):
        """Absolute threshold of each sub-layer, ``b + theta`` (>= 0).

        Returns
        -------
        torch.Tensor
            1-D, differentiable.
        """
        return (self.base + self.group_thresholds()[self.group]).clamp_min(0)

    def taus(self):
        """Temperature of each sub-layer: ``tau_scale`` times its mean score
        (a gate ``tau_scale`` spreads wide).

        Returns
        -------
        torch.Tensor
        """
        return self.tau_scale * self.center

    def _threshold_and_tau(self, index):
        """``thresholds()[index]`` and ``taus()[index]``, indexed with Python
        ints only: no device read-back."""
        theta = self.threshold_param[self._groups[index]] * self.lr_scale
        threshold = (self.base[index] + theta).clamp_min(0)
        return threshold, self.tau_scale * self.center[index]

    def squares(self, index, weights):
        """Squared scores ``s^2`` of the units of sub-layer ``index``.

        Arguments
        ---------
        index : int
            The sub-layer.
        weights : list of torch.Tensor
            Its matrices, in ``SubLayer.linears`` order.

        Returns
        -------
        torch.Tensor
        """
        sub = self.sublayers[index]
        scales = [self.weight_scale[i] for i in sub.linears]
        squares = unit_squares(weights, sub.axes, sub.unit_size, scales)
        return squares / self.spread[index].square()

    def all_squares(self):
        """Scores of the units of every sub-layer, from the current weights
        (no gradient).

        Returns
        -------
        list of torch.Tensor
        """
        with torch.no_grad():
            return [
                self.squares(i, [x.weight for x in layers])
                for i, layers in enumerate(self.sublayer_layers)
            ]

    def unit_mask(self, index, weights):
        """Soft mask of the units of sub-layer ``index``; with gradients on,
        its soft count of removed weights is recorded (differentiable in
        the threshold only, as for weight gates).

        Arguments
        ---------
        index : int
        weights : list of torch.Tensor
            As in ``squares``.

        Returns
        -------
        torch.Tensor
            One value per unit, in [0, 1].
        """
        square = self.squares(index, weights)
        threshold, tau = self._threshold_and_tau(index)
        mask = soft_mask_of_square(square, threshold, tau)
        if torch.is_grad_enabled():
            self.soft_zeros[index] = self.soft_zero_count(index, square)
        return mask

    def soft_zero_count(self, index, square):
        """Soft count of the gated weights sub-layer ``index`` removes,
        ``sum(n (1 - M))``, differentiable in its threshold only.

        Arguments
        ---------
        index : int
            The sub-layer.
        square : torch.Tensor
            Its units' scores (``squares``).

        Returns
        -------
        torch.Tensor
            0-d.
        """
        threshold, tau = self._threshold_and_tau(index)
        kept = soft_mask_of_square(square.detach(), threshold, tau)
        return (1 - kept).sum() * self.sublayers[index].unit_params

    def soft_zeros_and_slopes(self, squares, thresholds):
        """Soft counts of removed weights per sub-layer and their slopes, as
        ``kernels.eager.soft_zeros`` gives them for matrices.

        Arguments
        ---------
        squares : list of torch.Tensor
            Scores of every sub-layer's units.
        thresholds : torch.Tensor
            Absolute threshold of every sub-layer.

        Returns
        -------
        counts, slopes : torch.Tensor
            ``sum(n (1 - M))`` and ``sum(n M (1 - M) / tau)`` per sub-layer
            (``n``: weights per unit).
        """
        taus = self.taus()
        counts, slopes = [], []
        for i, square in enumerate(squares):
            mask = soft_mask_of_square(square, thresholds[i], taus[i])
            counts.append((1 - mask).sum() * self.unit_params[i])
            slope = (mask * (1 - mask)).sum() / taus[i]
            slopes.append(slope * self.unit_params[i])
        return torch.stack(counts), torch.stack(slopes)

    def hard_unit_masks(self, squares, thresholds):
        """The units the hard mask keeps (``s^2 > t^2``), per sub-layer.

        Arguments
        ---------
        squares : list of torch.Tensor
        thresholds : torch.Tensor
            As in ``soft_zeros_and_slopes``.

        Returns
        -------
        list of torch.Tensor
            Boolean, one per sub-layer.
        """
        return [
            hard_mask_of_square(s, thresholds[i]) for i, s in enumerate(squares)
        ]

    def hard_zeros(self, squares, thresholds):
        """Gated weights the hard mask removes, per sub-layer.

        Arguments
        ---------
        squares : list of torch.Tensor
        thresholds : torch.Tensor
            As in ``soft_zeros_and_slopes``.

        Returns
        -------
        torch.Tensor
            1-D, float.
        """
        masks = self.hard_unit_masks(squares, thresholds)
        removed = torch.stack([(~m).sum() for m in masks])
        return removed * self.unit_params

    def weight_masks(self, unit_masks, layers):
        """Boolean weight masks of every gated matrix from the unit masks.

        Arguments
        ---------
        unit_masks : list of torch.Tensor
            One boolean vector per sub-layer.
        layers : list of nn.Linear
            The gated matrices, in gate order.

        Returns
        -------
        list of torch.Tensor
            One mask per matrix, its shape.
        """
        masks = [None] * len(layers)
        for sub, units in zip(self.sublayers, unit_masks):
            for position, axis in zip(sub.linears, sub.axes):
                shape = layers[position].weight.shape
                mask = unit_broadcast(units, axis, sub.unit_size)
                masks[position] = mask.expand(shape).clone()
        return masks

    def unit_masks_of(self, weight_masks):
        """The units kept by weight masks (a unit is kept if any of its
        weights is): the inverse of ``weight_masks``.

        Arguments
        ---------
        weight_masks : list of torch.Tensor
            One boolean mask per gated matrix.

        Returns
        -------
        list of torch.Tensor
            One boolean vector per sub-layer.
        """
        kept = []
        for sub in self.sublayers:
            masks = [weight_masks[i] for i in sub.linears]
            ones = torch.ones(1, device=masks[0].device)
            counts = unit_squares(masks, sub.axes, sub.unit_size, [ones] * 4)
            kept.append(counts > 0)
        return kept


def _spread(norms):
    """Standard deviation of a sub-layer's unit norms (a positive floor
    for one unit or identical ones)."""
    if norms.numel() < 2:
        return norms.abs().mean().clamp_min(MIN_SCALE)
    return norms.std().clamp_min(norms.abs().mean() * 1e-3 + MIN_SCALE)


class StructuredGatedLinear(GatedLinear):
    """A ``nn.Linear`` whose rows (or columns) are gated unit by unit.

    The unit mask of the pass comes from its sub-layer (``install_structured``
    computes it once per sub-layer call, for all the sub-layer's matrices);
    a row-gated layer gates its bias too. After hard pruning the fixed
    ``mask`` (and ``bias_mask``) apply.

    Arguments
    ---------
    linear : nn.Linear
        The layer to gate (weights shared).
    gate : StructuredGate
        The gate (not registered as a submodule).
    index : int
        Position of this matrix among the gated ones.
    sublayer : int
        Its sub-layer in the gate.
    axis : int
        0: units are rows; 1: columns.
    unit_size : int
        Rows (or columns) per unit.

    Example
    -------
    >>> from torch import nn
    >>> sub = SubLayer("ff", (0, 1), (0, 1), 1, 2, 3)
    >>> norms = [torch.tensor([1.0, 2.0])]  # spread 0.71: scores 1.41, 2.83
    >>> gate = StructuredGate([sub], torch.ones(2), norms, [0], 0.01, -2.0)
    >>> up, down = nn.Linear(1, 2), nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = up.weight.copy_(torch.tensor([[0.1], [2.0]])), down.weight.fill_(1.0)
    >>> layers = [StructuredGatedLinear(up, gate, 0, 0, 0, 1),
    ...           StructuredGatedLinear(down, gate, 1, 0, 1, 1)]
    >>> gate.sublayer_layers = (tuple(layers),)
    >>> layers[0].effective_weight().detach().round(decimals=3).flatten()
    tensor([0., 2.])
    """

    def __init__(self, linear, gate, index, sublayer, axis, unit_size):
        super().__init__(linear, gate, index)
        self.sublayer, self.axis, self.unit_size = sublayer, axis, unit_size
        object.__setattr__(self, "unit_mask", None)

    def current_unit_mask(self):
        """The pass's unit mask, computed here if no sub-layer hook set it.

        Returns
        -------
        torch.Tensor
        """
        if self.unit_mask is not None:
            return self.unit_mask
        layers = self.gate.sublayer_layers[self.sublayer]
        return self.gate.unit_mask(self.sublayer, [x.weight for x in layers])

    def effective_weight(self, *args, **kwargs):
        """The weight multiplied by the unit mask (fixed mask if pruned).

        Arguments
        ---------
        *args, **kwargs
            Ignored (``GatedLinear``'s signature).

        Returns
        -------
        torch.Tensor
        """
        if self.mask is not None:
            return self.weight * self.mask
        mask = self.current_unit_mask().to(self.weight.dtype)
        return self.weight * unit_broadcast(mask, self.axis, self.unit_size)

    def effective_bias(self):
        """The bias, gated with the rows (column-gated layers: unchanged).

        Returns
        -------
        torch.Tensor or None
        """
        if self.bias is None or self.axis == 1:
            return self.bias
        if self.mask is not None:
            return self.bias * self.bias_mask
        mask = self.current_unit_mask().to(self.bias.dtype)
        return self.bias * mask.repeat_interleave(self.unit_size)

    def fix_mask(self, mask):
        """Fixes a hard mask: zeroes the pruned weights (and biases).

        Arguments
        ---------
        mask : torch.Tensor
            Boolean weight mask, whole units.
        """
        super().fix_mask(mask)
        if self.axis == 0 and self.bias is not None:
            self.bias_mask = self.mask.any(dim=1)
            with torch.no_grad():
                self.bias.mul_(self.bias_mask)

    def forward(self, x):
        """Linear transform with the gated weight and bias.

        Arguments
        ---------
        x : torch.Tensor
            Input features (..., in_features).

        Returns
        -------
        torch.Tensor
        """
        return F.linear(x, self.effective_weight(), self.effective_bias())


def install_structured(model, found, groups, options):
    """Replaces the gated linears by ``StructuredGatedLinear`` layers and
    hooks their sub-layers so that each call computes its unit mask once.

    Arguments
    ---------
    model : nn.Module
        The HuggingFace model (changed in place).
    found : list of (str, nn.Linear)
        The linears to gate (``lobes.find_prunable_linears``).
    groups : callable
        Sub-layer names -> tie group of each (``layers.group_indices``).
    options : SPGOptions

    Returns
    -------
    StructuredGate

    Example
    -------
    >>> from speechbrain_spg.data.architectures import build_config, build_model, TINY_OVERRIDES
    >>> from speechbrain_spg.layers import group_indices
    >>> from speechbrain_spg.lobes import find_prunable_linears
    >>> from speechbrain_spg.options import SPGOptions
    >>> model = build_model(build_config("hubert", **TINY_OVERRIDES))
    >>> options = SPGOptions(granularity="structured")
    >>> found = find_prunable_linears(model, options.prune_modules)
    >>> gate = install_structured(model, found, lambda n: group_indices(n, "linear"), options)
    >>> [(s.name, s.units) for s in gate.sublayers[:2]]
    [('encoder.layers.0.attention', 2), ('encoder.layers.0.feed_forward', 64)]
    """
    sublayers = find_sublayers(model, found)
    scales = torch.stack([m.weight.detach().float().std() for _, m in found])
    scales = scales.nan_to_num(0.0).clamp_min(MIN_SCALE)
    with torch.no_grad():
        norms = [
            unit_squares(
                [found[i][1].weight for i in sub.linears],
                sub.axes,
                sub.unit_size,
                [scales[i] for i in sub.linears],
            ).sqrt()
            for sub in sublayers
        ]
    gate = StructuredGate(
        sublayers,
        scales,
        norms,
        groups([sub.name for sub in sublayers]),
        options.tau_scale,
        options.threshold_init,
        lr_scale=options.gate_lr_scale,
    )
    gated = [None] * len(found)
    for index, sub in enumerate(sublayers):
        for position, axis in zip(sub.linears, sub.axes):
            name, linear = found[position]
            layer = StructuredGatedLinear(
                linear, gate, position, index, axis, sub.unit_size
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            gated[position] = layer
        module = model.get_submodule(sub.name)
        module.register_forward_pre_hook(_UnitMaskHook(gate, index, True))
        module.register_forward_hook(_UnitMaskHook(gate, index, False))
    gate.sublayer_layers = tuple(
        tuple(gated[i] for i in sub.linears) for sub in sublayers
    )
    return gate


class _UnitMaskHook:
    """Forward (pre-)hook of a sub-layer: sets the unit mask of its gated
    linears before the call (computed once), forgets it after."""

    def __init__(self, gate, index, before):
        self.gate, self.index, self.before = gate, index, before

    def __call__(self, module, *args):
        layers = self.gate.sublayer_layers[self.index]
        mask = None
        if self.before and layers[0].mask is None:
            weights = [layer.weight for layer in layers]
            mask = self.gate.unit_mask(self.index, weights)
        for layer in layers:
            object.__setattr__(layer, "unit_mask", mask)
