"""The gate and the matrix product of a gated linear layer in one autograd
node, for float32 CPU training with the C kernels and kept memory.

With the gate and ``F.linear`` as two autograd nodes, the product's backward
computes the gradient of ``W * M`` into new memory, the size of the weight,
and the gate's backward turns it into the weight's gradient, after which it
is freed. On a CPU the C library's allocator hands such blocks back to the
system and takes them again for the next layer, and the system zeroes every
page it hands out: in a HuBERT-large profile the weight-gradient products of
the feed-forward matrices (16 MB each) took 2.3 times as long in an SPG step
as in a dense one (``benchmarks/RESULTS.md``).

``GatedLinearFunction`` does the same arithmetic in one node. Its backward
writes that product into memory kept from step to step
(``reused_memory.ReusedMemory``, one per weight size, shared by the
matrices of that size: the backward uses it for one matrix at a time), and
the gate's backward kernel then writes the weight's gradient over ``W * M``
in the gated weight's own kept memory, which autograd keeps as ``W.grad``.
``W * M`` never leaves the node, so nothing but the node can hold it when
the backward overwrites it.

Authors
 * speechbrain-spg developers 2026
"""

import torch
import torch.nn.functional as F

from speechbrain_spg import native_gate
from speechbrain_spg.fused_gate import _mask
from speechbrain_spg.reused_memory import alias


def takes(x, weight, bias, threshold, tau):
    """Whether ``GatedLinearFunction`` runs a call with these tensors: all
    plain float32 CPU tensors and the C kernels available (``native_gate``);
    ``x`` may have any layout, the others must be contiguous.

    Arguments
    ---------
    x : torch.Tensor
        The layer's input.
    weight : torch.Tensor
        The gated weight matrix.
    bias : torch.Tensor or None
        The layer's bias.
    threshold : torch.Tensor
        0-d threshold.
    tau : torch.Tensor
        0-d temperature.

    Returns
    -------
    bool

    Example
    -------
    >>> t, tau = torch.tensor(0.5), torch.tensor(0.1)
    >>> takes(torch.ones(2, 3), torch.ones(4, 3), None, t, tau) == native_gate.available()
    True
    >>> takes(torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 3), None, t, tau)
    False
    """
    return (
        type(x) is torch.Tensor  # noqa: E721 - no subclass
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and native_gate.supports((weight, bias, threshold, tau))
    )


class GatedLinearFunction(torch.autograd.Function):
    """``(F.linear(x, W * M, b), sum(1 - M))`` with gradients of ``x``,
    ``W``, ``b`` and ``t`` (see the module docstring).

    The numbers are those of ``FusedPinchFunction`` followed by
    ``F.linear``: the same C kernels and matrix products. The backward reads
    the mask back from ``W * M`` (``native_gate.backward_from_gated``).

    A second backward of a retained graph computes ``W * M`` again: the
    first one wrote the weight's gradient over it. A backward with
    ``create_graph=True`` (a gradient penalty) builds the gradients from
    differentiable operations instead (``_gradients_with_graph``).

    Example
    -------
    >>> from speechbrain_spg.reused_memory import ReusedMemory
    >>> x = torch.randn(5, 3, requires_grad=True)
    >>> w = torch.randn(4, 3, requires_grad=True)
    >>> t, tau = torch.tensor(0.5, requires_grad=True), torch.tensor(0.05)
    >>> if takes(x, w, None, t, tau):
    ...     y, zeros = GatedLinearFunction.apply(
    ...         x, w, None, t, tau, ReusedMemory(), ReusedMemory()
    ...     )
    ...     (y.sum() + zeros).backward()
    ...     assert w.grad.shape == w.shape and t.grad.shape == ()
    """

    @staticmethod
    def forward(ctx, x, weight, bias, threshold, tau, memory, product_memory):
        """Output of the layer and expected number of pinched weights.

        Arguments
        ---------
        ctx : context
            Autograd context.
        x : torch.Tensor
            Input (..., in_features).
        weight : torch.Tensor
            Weight (out_features, in_features).
        bias : torch.Tensor or None
            Bias (out_features).
        threshold : torch.Tensor
            0-d absolute threshold.
        tau : torch.Tensor
            0-d temperature.
        memory : reused_memory.ReusedMemory
            This matrix's kept memory: ``W * M``, then the weight's
            gradient.
        product_memory : reused_memory.ReusedMemory
            Kept memory of this weight's size for the gradient of ``W * M``
            during the backward.

        Returns
        -------
        output : torch.Tensor
            ``F.linear(x, W * M, b)``.
        soft_zeros : torch.Tensor
            0-d ``sum(1 - M)``.
        """
        gated, mask_sum = native_gate.forward(
            weight, threshold, tau, out=memory.take(weight)
        )
        # x only for the weight-gradient product (as F.linear).
        needs_product = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(
            x if needs_product else None, weight, threshold, tau
        )
        ctx.gated, ctx.product_memory = gated, product_memory
        ctx.x_shape = x.shape
        return F.linear(x, gated, bias), weight.numel() - mask_sum

    @staticmethod
    def backward(ctx, grad_output, grad_zeros):
        """Gradients of ``x``, ``W``, ``b`` and ``t``.

        Arguments
        ---------
        ctx : context
            Autograd context.
        grad_output : torch.Tensor
            Gradient with respect to the output.
        grad_zeros : torch.Tensor or None
            Gradient with respect to the soft-zero count.

        Returns
        -------
        tuple
            Gradients of ``x``, ``weight``, ``bias``, ``threshold``; None
            for the memories.
        """
        if torch.is_grad_enabled():  # create_graph=True
            return _gradients_with_graph(ctx, grad_output, grad_zeros)
        x, weight, threshold, tau = ctx.saved_tensors
        gated = ctx.gated
        if gated is None:  # a second backward: the first overwrote W * M
            gated, _ = native_gate.forward(weight, threshold, tau)
        grad_rows = grad_output.reshape(-1, weight.shape[0])
        grad_x = grad_bias = grad_weight = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_rows, gated).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_gated = ctx.product_memory.take(weight)
            torch.mm(
                grad_rows.t(), x.reshape(-1, weight.shape[1]), out=grad_gated
            )
            if grad_zeros is None:
                grad_zeros = torch.zeros((), dtype=weight.dtype)
            # Over W * M, each weight read before it is written: in its
            # kept memory (first backward) or in the recomputed copy.
            ctx.gated = None
            grad_threshold = native_gate.backward_from_gated(
                weight,
                gated,
                threshold,
                tau,
                grad_gated,
                grad_zeros.contiguous(),
                out=gated,
            ).to(threshold.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = alias(gated)  # autograd keeps it as W.grad
        return grad_x, grad_weight, grad_bias, grad_threshold, None, None, None


def _gradients_with_graph(ctx, grad_output, grad_zeros):
    """The gradients of ``GatedLinearFunction.backward`` as differentiable
    tensors, for ``create_graph=True``: the gate's math in PyTorch
    operations (``fused_gate``'s eager mask; no kernel, no kept memory),
    the soft-zero count differentiable in ``t`` only, as
    ``FusedPinchFunction``'s."""
    x, weight, threshold, tau = ctx.saved_tensors
    ctx.gated = None
    needs = ctx.needs_input_grad
    gated = weight * _mask(weight, threshold, tau)
    grad_rows = grad_output.reshape(-1, weight.shape[0])
    grad_x = grad_bias = grad_weight = grad_threshold = None
    if needs[0]:
        grad_x = torch.mm(grad_rows, gated).view(ctx.x_shape)
    if needs[2]:
        grad_bias = grad_rows.sum(0)
    if needs[1] or needs[3]:
        grad_gated = torch.mm(grad_rows.t(), x.reshape(-1, weight.shape[1]))
        outputs, grads = [gated], [grad_gated]
        if grad_zeros is not None:
            unmoved = _mask(weight.detach(), threshold, tau)
            outputs.append((1 - unmoved).sum())
            grads.append(grad_zeros)
        inputs = [
            v for v, need in ((weight, needs[1]), (threshold, needs[3])) if need
        ]
        found = iter(
            torch.autograd.grad(
                outputs, inputs, grads, create_graph=True, allow_unused=True
            )
        )
        grad_weight = next(found) if needs[1] else None
        grad_threshold = next(found) if needs[3] else None
    return grad_x, grad_weight, grad_bias, grad_threshold, None, None, None
