"""The reference formula of the gate (``speechbrain_spg.gate``).

Values computed by hand, gradients checked numerically (``gradcheck``),
the hand-written chain rule against autograd, the hard mask against the
soft one, the soft-zero count, and the clip of the sigmoid's argument,
which must change no value in any dtype.
"""

import math

import pytest
import torch

from speechbrain_spg.gate import (
    SIGMOID_SATURATION,
    chain_rule,
    gated_weight,
    hard_mask,
    pinch_argument,
    soft_mask,
    soft_zero_count,
)


def sigmoid(x):
    """The logistic function in Python floats."""
    return 1 / (1 + math.exp(-x))


def _weight_and_threshold(seed=0, shape=(7, 5)):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, dtype=torch.float64, generator=generator)
    threshold = torch.tensor(0.6, dtype=torch.float64)
    return weight, threshold


def test_pinch_argument_by_hand():
    # (W^2 - t^2) / (2 tau) with t^2 = 0.25, 2 tau = 0.25; 10 gives 399,
    # clipped to the saturation.
    weight = torch.tensor([0.0, 0.5, 1.0, -1.0, 10.0], dtype=torch.float64)
    for threshold in (0.5, -0.5, torch.tensor(0.5, dtype=torch.float64)):
        x = pinch_argument(weight, threshold, 0.125)
        assert x.tolist() == [-1.0, 0.0, 3.0, 3.0, 80.0]
        assert x.dtype == torch.float64 and x.shape == weight.shape


def test_mask_gated_weight_and_soft_zero_count_by_hand():
    # t = 1, tau = 0.5: the arguments are W^2 - 1.
    weight = torch.tensor([[0.0, 1.0], [2.0, -2.0]], dtype=torch.float64)
    threshold, tau = torch.tensor(1.0, dtype=torch.float64), 0.5
    expected_mask = [[sigmoid(-1.0), 0.5], [sigmoid(3.0), sigmoid(3.0)]]
    mask = soft_mask(weight, threshold, tau)
    torch.testing.assert_close(
        mask,
        torch.tensor(expected_mask, dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )
    assert mask[0, 0].item() == pytest.approx(0.2689414213699951, abs=1e-15)
    gated = gated_weight(weight, threshold, tau)
    expected_gated = [[0.0, 0.5], [2 * sigmoid(3.0), -2 * sigmoid(3.0)]]
    torch.testing.assert_close(
        gated,
        torch.tensor(expected_gated, dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )
    count = soft_zero_count(weight, threshold, tau)
    expected_count = 4 - sigmoid(-1.0) - 0.5 - 2 * sigmoid(3.0)
    assert count.shape == () and count.item() == pytest.approx(
        expected_count, abs=1e-14
    )


def test_gated_weight_keeps_dtype_and_shape():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        weight = torch.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4)
        gated = gated_weight(weight, torch.tensor(0.3, dtype=dtype), 0.005)
        assert gated.dtype == dtype and gated.shape == (3, 4)
        # W = -1: argument (1 - 0.09) / 0.01 = 91, clipped, M = 1 exactly.
        assert gated[0, 0].item() == -1.0
        # W = 1 / 11: argument -8.17, M = 2.8e-4, W * M = 2.6e-5.
        assert 0 < gated[1, 2].item() < 3e-5


def test_hard_mask_is_strict_and_ignores_signs():
    weight = torch.tensor([-2.0, -1.0, 0.5, 1.0, 1.5, 0.0])
    expected = [True, False, False, False, True, False]
    for threshold in (1.0, -1.0, torch.tensor(-1.0)):
        mask = hard_mask(weight, threshold)
        assert mask.dtype == torch.bool and mask.tolist() == expected


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_gated_weight_gradcheck_weight_and_threshold(tau):
    weight, threshold = _weight_and_threshold()
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(
        gated_weight, (weight, threshold, tau), eps=1e-6, atol=1e-8
    )


def test_gated_weight_gradcheck_threshold_only():
    weight, threshold = _weight_and_threshold(seed=1)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(
        gated_weight, (weight, threshold, 0.1), eps=1e-6, atol=1e-8
    )


def test_soft_zero_count_gradcheck_threshold():
    weight, threshold = _weight_and_threshold(seed=2)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(
        soft_zero_count, (weight, threshold, 0.1), eps=1e-6, atol=1e-8
    )


def test_chain_rule_matches_autograd():
    """``chain_rule`` (what every fused backend's backward computes) gives
    autograd's gradients of ``W * M`` and ``sum(1 - M)``."""
    weight, threshold = _weight_and_threshold(seed=3, shape=(32, 16))
    tau = 0.08
    upstream = torch.randn(
        32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )
    grad_zeros = 2.5
    w = weight.clone().requires_grad_(True)
    t = threshold.clone().requires_grad_(True)
    loss = (gated_weight(w, t, tau) * upstream).sum()
    (loss + grad_zeros * soft_zero_count(w, t, tau)).backward()

    mask = soft_mask(weight, threshold, tau)
    factor, grad_t = chain_rule(
        weight, mask, threshold, tau, upstream, grad_zeros
    )
    assert (upstream * factor - w.grad).abs().max().item() <= 1e-12
    assert abs(grad_t.item() - t.grad.item()) <= 1e-12
    # The threshold gradient is not trivially zero.
    assert abs(t.grad.item()) > 1e-3
    # Partial sums (a backend's per-row reduction) add up to the same.
    factor_rows, grad_rows = chain_rule(
        weight,
        mask,
        threshold,
        tau,
        upstream,
        grad_zeros,
        lambda x: x.sum(dim=-1),
    )
    assert grad_rows.shape == (32,)
    assert torch.equal(factor_rows, factor)
    assert abs(grad_rows.sum().item() - t.grad.item()) <= 1e-12


def test_chain_rule_of_the_soft_zero_count_alone():
    """``d sum(1 - M) / dt = t sum(M (1 - M) / tau)``, and no gradient of
    the gated weight: the factor is then unused, the threshold's from the
    count only."""
    weight, threshold = _weight_and_threshold(seed=4, shape=(20, 10))
    tau = 0.08
    t = threshold.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    count = soft_zero_count(w, t, tau)
    count.backward()
    mask = soft_mask(weight, threshold, tau)
    assert abs(count.item() - (1 - mask).sum().item()) <= 1e-12
    _, grad_t = chain_rule(weight, mask, threshold, tau, 0.0, 1.0)
    slope = (mask * (1 - mask) / tau).sum() * threshold
    assert abs(t.grad.item() - grad_t.item()) <= 1e-12
    assert abs(t.grad.item() - slope.item()) <= 1e-12
    assert t.grad.item() > 0  # a larger threshold pinches more weights
    # Differentiable in the threshold only.
    assert w.grad is None


def test_threshold_sign_does_not_matter():
    weight, threshold = _weight_and_threshold(seed=5)
    assert torch.equal(
        gated_weight(weight, threshold, 0.1),
        gated_weight(weight, -threshold, 0.1),
    )
    assert torch.equal(
        soft_zero_count(weight, threshold, 0.1),
        soft_zero_count(weight, -threshold, 0.1),
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
    assert near.any()
    assert ((soft[near] > 0.05) & (soft[near] < 0.95)).all()


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
def test_sigmoid_saturation_changes_no_mask_value(dtype):
    # Clipping the argument there is exact: the sigmoid is already 1.
    at = torch.tensor(SIGMOID_SATURATION, dtype=dtype)
    assert torch.sigmoid(at).item() == 1.0
    assert torch.sigmoid(at - 1).item() == 1.0
    # The clipped formula equals the unclipped one everywhere, from far
    # below the threshold to arguments in the thousands (and +-inf where
    # W^2 overflows float16).
    weight = torch.cat(
        [torch.linspace(-40.0, 40.0, 801), torch.tensor([0.0, 0.3, 2.0])]
    ).to(dtype)
    threshold, tau = torch.tensor(0.3, dtype=dtype), 0.01
    unclipped = torch.sigmoid((weight * weight - threshold**2) / (2 * tau))
    assert (pinch_argument(weight, threshold, tau) == SIGMOID_SATURATION).any()
    assert torch.equal(soft_mask(weight, threshold, tau), unclipped)
    assert torch.equal(gated_weight(weight, threshold, tau), weight * unclipped)


def test_sigmoid_saturation_is_a_constant_for_torch_compile():
    # A float global would be traced as a 0-d tensor read back with .item()
    # in every compiled call (seen on CUDA as 2 reads per gated matrix).
    assert type(SIGMOID_SATURATION) is int
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(pinch_argument, backend=backend, dynamic=True)
    out = compiled(torch.ones(2, 3), torch.tensor(0.5), torch.tensor(0.25))
    assert torch.equal(out, torch.full((2, 3), 1.5))
    assert len(graphs) == 1
    assert "item" not in graphs[0].code


def test_sigmoid_saturation_keeps_the_exponential_a_normal_number():
    # exp(-x) of every clipped argument is at least exp(-80), a normal
    # float32 number (exp(-88) would already be subnormal).
    smallest = torch.exp(torch.tensor(-float(SIGMOID_SATURATION)))
    assert smallest.item() >= torch.finfo(torch.float32).tiny
    weight = torch.tensor([0.0, 0.01, 1.0, 100.0])
    x = pinch_argument(weight, torch.tensor(0.01), torch.tensor(1e-6))
    assert x.tolist() == [-50.0, 0.0, SIGMOID_SATURATION, SIGMOID_SATURATION]
