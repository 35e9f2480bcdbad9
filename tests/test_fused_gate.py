"""The fast gate paths compute what the reference path computes.

``gate_impl: fused`` (eager) and ``gate_impl: compiled`` (torch.compile) must
give the reference outputs and the reference gradients of the weights, the
thresholds and the multipliers, within float32 rounding, for a whole lobe
training step (task loss + sparsity loss).
"""

import pytest
import torch

from speechbrain_spg.fused_gate import FusedPinchFunction
from speechbrain_spg.gates import PinchFunction, SoftZerosFunction
from speechbrain_spg.lobes import SPGWav2Vec2


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_function_matches_reference_functions(compiled):
    torch.manual_seed(0)
    weight = torch.randn(64, 48) * 0.05
    threshold = torch.tensor(0.04)
    tau = torch.tensor(0.02 * 0.05**2)
    upstream = torch.randn(64, 48)

    def run(fused):
        w = weight.clone().requires_grad_()
        t = threshold.clone().requires_grad_()
        if fused:
            gated, zeros = FusedPinchFunction.apply(w, t, tau, compiled)
        else:
            gated = PinchFunction.apply(w, t, tau)
            zeros = SoftZerosFunction.apply(w.detach(), t, tau)
        ((gated * upstream).sum() + 3.0 * zeros).backward()
        return gated.detach(), zeros.detach(), w.grad, t.grad

    for ref, fast in zip(run(False), run(True)):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def lobe_step(source, impl):
    """One training step of a tiny lobe; returns outputs and gradients."""
    torch.manual_seed(0)
    lobe = SPGWav2Vec2(
        source,
        save_path="",
        target_sparsity=0.5,
        threshold_init=0.6,
        gate_impl=impl,
    )
    lobe.model.config.layerdrop = 0.0
    lobe.train()
    lobe.gate.step += 5
    lobe.regularizer.multiplier_param.data.fill_(0.3)
    torch.manual_seed(1)
    wav = torch.randn(2, 4000)
    for module in lobe.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    out = lobe(wav)
    sparsity_loss = lobe.sparsity_loss()
    (out.pow(2).mean() + sparsity_loss).backward()
    grads = {
        name: p.grad.clone()
        for name, p in lobe.named_parameters()
        if p.grad is not None
    }
    return out.detach(), sparsity_loss.detach(), grads


@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_lobe_step_matches_reference(wav2vec2_source, impl):
    ref_out, ref_loss, ref_grads = lobe_step(wav2vec2_source, "reference")
    out, loss, grads = lobe_step(wav2vec2_source, impl)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert set(grads) == set(ref_grads)
    assert "gate.threshold_param" in grads
    assert "regularizer.multiplier_param" in grads
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name
        )
