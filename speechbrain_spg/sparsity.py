"""Sparsity measurement and control for self-pinching gates.

Soft (expected) sparsity, the mean of ``1 - M`` over the gated weights, is
differentiable in the thresholds; hard sparsity counts the weights that
pruning removes (``|W| <= |t|``). A Lagrangian regulariser,

    L = lambda_1 * (s - target) + (lambda_2 + damping) * (s - target)^2,

drives the soft sparsity ``s`` to a scheduled target. The multipliers are
maximised while everything else is minimised: they pass through a gradient
reversal, so ONE ordinary minimising optimiser over all parameters performs
their gradient ascent. ``damping`` (option ``sparsity_damping``, default 0)
is a fixed restoring force that ``lambda_1`` need not build up first: less
oscillation and overshoot, nothing at the target, but large values make the
layers' sparsities more alike.

The default controller (option ``sparsity_controller: projection``) needs no
multiplier: before each training step's forward pass, a Newton step on ONE
offset shared by all thresholds (in weight-std units) puts the soft sparsity
on the scheduled target (``offset_step``), and the thresholds' gradient loses
its component along the sparsity's gradient (``project_out``: the exact
Lagrange multiplier of the step), so the task loss only moves the thresholds
along the constraint and decides how the layers share the sparsity. Both
controllers are this project's design, not the paper's.

Authors
 * speechbrain-spg developers 2026
"""

import dataclasses
import math

import torch
from torch import nn

from speechbrain_spg.gate import hard_mask


def validate_target(target, key="target_sparsity"):
    """Checks that a sparsity target lies in [0, 1).

    Arguments
    ---------
    target : float
        The target fraction of removed weights.
    key : str
        Name of the hyperparameter, for the error message.

    Returns
    -------
    float

    Example
    -------
    >>> validate_target(0.65)
    0.65
    >>> validate_target(1.0)
    Traceback (most recent call last):
      ...
    ValueError: target_sparsity: must be a number in [0, 1), got 1.0.
    """
    ok = isinstance(target, (int, float)) and not isinstance(target, bool)
    if not (ok and 0 <= target < 1):
        raise ValueError(f"{key}: must be a number in [0, 1), got {target!r}.")
    return float(target)


def validate_damping(damping, key="sparsity_damping"):
    """Checks that a damping coefficient is a finite number >= 0.

    Arguments
    ---------
    damping : float
        The fixed quadratic coefficient of the regulariser.
    key : str
        Name of the hyperparameter, for the error message.

    Returns
    -------
    float

    Example
    -------
    >>> validate_damping(100)
    100.0
    >>> validate_damping(float("inf"))
    Traceback (most recent call last):
      ...
    ValueError: sparsity_damping: must be a finite number >= 0, got inf.
    """
    ok = isinstance(damping, (int, float)) and not isinstance(damping, bool)
    if not (ok and math.isfinite(damping) and damping >= 0):
        raise ValueError(
            f"{key}: must be a finite number >= 0, got {damping!r}."
        )
    return float(damping)


def scheduled_target(step, target, warmup_steps=0, ramp_steps=0):
    """Target sparsity at a training step: 0 during warm-up, then a linear ramp.

    Arguments
    ---------
    step : int
        Training steps done so far.
    target : float
        Final target sparsity.
    warmup_steps, ramp_steps : int
        Steps with target 0 (the gates learn from the task loss alone), then
        of the linear rise to ``target``.

    Returns
    -------
    float

    Example
    -------
    >>> [scheduled_target(s, 0.6, 2, 4) for s in (0, 2, 4, 6, 9)]
    [0.0, 0.0, 0.3, 0.6, 0.6]
    """
    if step < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return target
    return target * min(1.0, (step - warmup_steps) / ramp_steps)


class GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward: ``apply(x)`` is a view
    of ``x``, and ``x`` gets minus the gradient that reaches it.

    Example
    -------
    >>> x = torch.tensor(2.0, requires_grad=True)
    >>> (3 * GradientReversal.apply(x)).backward()
    >>> x.grad
    tensor(-3.)
    """

    @staticmethod
    def forward(ctx, x):
        """A view of ``x`` (``ctx``: the autograd context)."""
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        """The upstream gradient, negated."""
        return -grad_output


class AuxiliaryLossInjection(torch.autograd.Function):
    """``apply(x, aux_loss)``: a view of ``x`` whose backward also gives the
    scalar ``aux_loss`` gradient 1, as if it had been added to the main loss.

    A module can so attach its own regulariser to a recipe that only
    optimises its own loss.

    Example
    -------
    >>> x = torch.ones(2, requires_grad=True)
    >>> a = torch.tensor(0.0, requires_grad=True)
    >>> y = AuxiliaryLossInjection.apply(x, 5 * a)
    >>> y.sum().backward()
    >>> x.grad, a.grad
    (tensor([1., 1.]), tensor(5.))
    """

    @staticmethod
    def forward(ctx, x, aux_loss):
        """A view of ``x`` (``ctx``: the autograd context)."""
        ctx.aux_shape = aux_loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        """``grad_output`` for ``x``, ones for ``aux_loss``."""
        ones = torch.ones(
            ctx.aux_shape, dtype=grad_output.dtype, device=grad_output.device
        )
        return grad_output, ones


class LagrangianSparsityRegularizer(nn.Module):
    """Drives the soft sparsity to a scheduled target with two multipliers.

    Arguments
    ---------
    target : float
        Final target sparsity in [0, 1).
    warmup_steps, ramp_steps : int
        Schedule of the target (see ``scheduled_target``).
    lr_scale : float
        The multipliers are stored divided by it (see ``SelfPinchingGate``).
    damping : float
        Fixed coefficient added to ``lambda_2`` (>= 0; see the module doc).

    Example
    -------
    >>> reg = LagrangianSparsityRegularizer(0.5)
    >>> reg(torch.tensor(0.3), step=10)
    tensor(0., grad_fn=<AddBackward0>)
    >>> reg.multiplier_param.data.fill_(1.0)
    tensor([1., 1.])
    >>> round(reg(torch.tensor(0.3), step=10).item(), 4)
    -0.16
    >>> LagrangianSparsityRegularizer(0.5, warmup_steps=100)(torch.tensor(0.3), 10)
    tensor(0., grad_fn=<AddBackward0>)
    >>> round(LagrangianSparsityRegularizer(0.5, damping=10.0)(torch.tensor(0.3), 10).item(), 4)
    0.4
    """

    def __init__(
        self, target, warmup_steps=0, ramp_steps=0, lr_scale=1.0, damping=0.0
    ):
        super().__init__()
        self.target = validate_target(target)
        self.warmup_steps = int(warmup_steps)
        self.ramp_steps = int(ramp_steps)
        self.lr_scale = float(lr_scale)
        self.damping = validate_damping(damping)
        self.multiplier_param = nn.Parameter(torch.zeros(2))

    def target_at(self, step):
        """The scheduled target in force after ``step`` training steps.

        Arguments
        ---------
        step : int
            Training steps done.

        Returns
        -------
        float
        """
        return scheduled_target(
            int(step), self.target, self.warmup_steps, self.ramp_steps
        )

    def multipliers(self):
        """The two Lagrange multipliers (lambda_1, lambda_2)."""
        return self.multiplier_param.detach() * self.lr_scale

    def forward(self, soft_sparsity, step):
        """Lagrangian term for the current soft sparsity.

        Arguments
        ---------
        soft_sparsity : torch.Tensor
            Scalar expected sparsity (differentiable in the thresholds).
        step : int
            Training steps done (for the schedule).

        Returns
        -------
        torch.Tensor
            Scalar loss to minimise (the multipliers ascend: see module).
        """
        if step < self.warmup_steps:
            # No constraint yet: a zero target cannot be met (soft sparsity is
            # never exactly 0), and the multipliers would wind up meanwhile.
            return (self.multiplier_param * 0).sum() + soft_sparsity * 0
        gap = soft_sparsity - self.target_at(step)
        lam = GradientReversal.apply(self.multiplier_param) * self.lr_scale
        return lam[0] * gap + (lam[1] + self.damping) * gap * gap


def offset_step(zeros, derivatives, target_zeros, max_step=0.25):
    """Newton step of the offset shared by all thresholds that brings the
    soft-zero count to ``target_zeros`` (tensors only: no device read-back).

    Arguments
    ---------
    zeros : torch.Tensor
        Soft-zero count of each matrix (1-D).
    derivatives : torch.Tensor
        Derivative of each count in the offset (1-D, >= 0).
    target_zeros : torch.Tensor or float
        The count to reach.
    max_step : float
        Largest step (the count is a sigmoid sum: far away it is flat).

    Returns
    -------
    torch.Tensor
        0-d.

    Example
    -------
    >>> offset_step(torch.tensor([3.0, 5.0]), torch.tensor([10.0, 10.0]), 10.0)
    tensor(0.1000)
    >>> offset_step(torch.tensor([3.0]), torch.tensor([0.0]), 10.0)
    tensor(0.2500)
    """
    gap, slope = target_zeros - zeros.sum(), derivatives.sum()
    flat = torch.sign(gap) * max_step
    step = torch.where(slope > 0, gap / slope.clamp_min(1e-30), flat)
    return step.clamp(-max_step, max_step)


def project_out(grad, normal):
    """``grad`` less its component along ``normal`` (unchanged if ``normal``
    is None or zero; no device read-back).

    Arguments
    ---------
    grad, normal : torch.Tensor
        1-D, same size.

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> project_out(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]))
    tensor([0., 1.])
    >>> project_out(torch.tensor([2.0, 1.0]), torch.zeros(2))
    tensor([2., 1.])
    """
    if normal is None:
        return grad
    normal = normal.to(grad.dtype)
    norm = normal @ normal
    scale = torch.where(norm > 0, (grad @ normal) / norm.clamp_min(1e-30), 0)
    return grad - scale * normal


def hard_zero_counts(weights, thresholds):
    """Number of weights the hard mask removes in each matrix.

    Arguments
    ---------
    weights : list of torch.Tensor
        The gated matrices.
    thresholds : torch.Tensor
        Absolute threshold of each matrix.

    Returns
    -------
    torch.Tensor
        1-D long tensor of counts.

    Example
    -------
    >>> w = [torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.1, 5.0])]
    >>> hard_zero_counts(w, torch.tensor([1.0, 1.0]))
    tensor([1, 2])
    """
    with torch.no_grad():
        zeros = (~hard_mask(w, thresholds[i]) for i, w in enumerate(weights))
        return torch.stack([zero.sum() for zero in zeros])


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """Sparsity of one gated matrix.

    Arguments
    ---------
    name : str
        Module name.
    group : int
        Tie group.
    numel : int
        Number of weights.
    hard, soft : float
        Fraction removed by the hard mask; expected by the soft mask.
    threshold : float
        Absolute threshold.

    Example
    -------
    >>> LayerSparsity("q", 0, 10, 0.5, 0.49, 0.1).hard
    0.5
    """

    name: str
    group: int
    numel: int
    hard: float
    soft: float
    threshold: float


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Sparsity of a gated model, overall and per matrix.

    Arguments
    ---------
    target, soft, hard : float
        Target, soft (expected) and hard sparsity of the gated weights.
    total_params, gated_params, removed_params : int
        Parameters of the wrapped model; weights under a gate; weights the
        hard mask removes.
    layers : tuple of LayerSparsity
        Per-matrix details.

    Example
    -------
    >>> rep = SparsityReport(0.5, 0.5, 0.5, 100, 80, 40, ())
    >>> rep.nonzero_params, rep.model_sparsity, rep.compression_ratio
    (60, 0.4, 1.6666666666666667)
    """

    target: float
    soft: float
    hard: float
    total_params: int
    gated_params: int
    removed_params: int
    layers: tuple

    @property
    def nonzero_params(self):
        """Parameters left after hard pruning."""
        return self.total_params - self.removed_params

    @property
    def model_sparsity(self):
        """Fraction of ALL model parameters removed."""
        return self.removed_params / self.total_params

    @property
    def compression_ratio(self):
        """``total_params / nonzero_params``."""
        return self.total_params / self.nonzero_params

    def as_dict(self):
        """Plain-JSON form, with the derived counts.

        Returns
        -------
        dict
            All fields, ``layers`` as a list of dicts.
        """
        out = dataclasses.asdict(self)
        out["layers"] = [dataclasses.asdict(layer) for layer in self.layers]
        out["nonzero_params"] = self.nonzero_params
        out["model_sparsity"] = self.model_sparsity
        out["compression_ratio"] = self.compression_ratio
        return out

    def table(self):
        """Readable per-layer table with a summary line.

        Returns
        -------
        str
            Fixed-width text table.
        """
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [
            f"{'layer':<{width}}  group      numel    hard    soft  threshold"
        ]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.group:>5}  {layer.numel:>9}"
                f"  {layer.hard:6.4f}  {layer.soft:6.4f}  {layer.threshold:9.3e}"
            )
        lines.append(
            f"gated: target {self.target:.4f}  hard {self.hard:.4f}  "
            f"soft {self.soft:.4f} | model: {self.nonzero_params}/"
            f"{self.total_params} params kept, sparsity "
            f"{self.model_sparsity:.4f}, ratio {self.compression_ratio:.2f}x"
        )
        return "\n".join(lines)

    __str__ = table
